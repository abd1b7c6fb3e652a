#!/usr/bin/env bash
# Everything a short GPU lease is for, in one call: the CUDA tests, then benchmarks/gpu.py within a time
# budget. Run from the repository root on the GPU machine; every log and the results JSON go to $OUT.
#
#   FWSWEEP_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_lease.sh
#
# That machine has its own python3 with a CUDA torch but not this project's other packages: the few that
# the tests and the benchmark import (pydantic and its parts) travel as wheels in .whl/ (docs/benchmarks.md,
# "GPU", says how to fetch them), installed to a scratch folder. Ray, Optuna and MLflow are not needed:
# the sharing test runs trials as plain processes, as Tune's fractional-GPU trials would be.
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv |
    tee "$OUT/nvidia_smi.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 2

# the tests that skip without a GPU: CUDA against the CPU (models), the trial loop on CUDA, graphed steps
timeout "${CUDA_TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_models.py tests/test_train.py tests/test_cuda_graph.py -k "cuda or graph" 2>&1 |
    tee "$OUT/cuda_tests.txt"

# the grid stops starting new points after GPU_BUDGET_S; the sharing tests (eager, then graphed: 1, 2, 4
# and 8 trials, each ~10 s after start-up) run after it
# shellcheck disable=SC2086 # GPU_SHARE is a list of counts
timeout "${GPU_BENCH_TIMEOUT:-420}" python3 benchmarks/gpu.py --budget-s "${GPU_BUDGET_S:-150}" \
    --share ${GPU_SHARE:-1 2 4 8} --share-seconds "${GPU_SHARE_SECONDS:-10}" 2>&1 | tee "$OUT/gpu_bench.txt"
cp benchmarks/results/gpu.json "$OUT/" 2>/dev/null || echo "no gpu.json written" >&2
