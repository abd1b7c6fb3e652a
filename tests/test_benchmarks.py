"""Benchmark plumbing: results recorded as JSON with their context, docs tables rendered from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402
import models  # noqa: E402
import render  # noqa: E402
from record import record, scratch_home  # noqa: E402

from sweep.models import matmul  # noqa: E402


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_recorded_benchmark_carries_its_machine_load_and_commit(tmp_path):
    with record("demo", {"x": 1}, kind="models", results_dir=tmp_path) as payload:
        payload["results"] = {"value": 3}
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["results"] == {"value": 3} and saved["kind"] == "models" and saved["args"] == {"x": 1}
    assert len(saved["load_average_before"]) == 3 and len(saved["load_average_after"]) == 3
    assert saved["machine"]["cpu_model"] and saved["machine"]["logical_cpus"] >= 1
    assert saved["machine"]["torch"] == torch.__version__
    assert "git_commit" in saved and saved["started_utc"] <= saved["finished_utc"]


def test_a_benchmark_home_is_the_users_or_a_temp_folder_removed_after(tmp_path, monkeypatch):
    monkeypatch.delenv("FWSWEEP_HOME", raising=False)
    with scratch_home() as home:
        assert os.environ["FWSWEEP_HOME"] == str(home) and home.is_dir()
        (home / "sweeps").mkdir()  # a sweep's state: hundreds of MB after a real run
    assert not home.exists() and "FWSWEEP_HOME" not in os.environ
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path))
    with scratch_home() as home:
        assert home == tmp_path
    assert tmp_path.is_dir()  # the user's own folder stays


def test_a_failed_benchmark_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError), record("demo", {}, results_dir=tmp_path) as payload:
        payload["results"] = {"partial": True}
        raise RuntimeError("measurement failed")
    assert not (tmp_path / "demo.json").exists()


def test_the_step_flop_count_is_written_out():
    B, T, H, E, V = 128, 19, 100, 100, 37
    fw = models.train_step_flops("fw_lstm", {"fw_form": "fused"}, H, B, T, textbook=True)
    ln = models.train_step_flops("ln_lstm", {}, H, B, T, textbook=True)
    # input and recurrent matmuls (3 x forward), the head, and 12·D per (read, stored vector) pair
    head = 6 * B * (H * 100 + 100 * 10)
    assert ln == 6 * B * T * E * 4 * H + 6 * B * T * H * 4 * H + head
    assert fw == ln + 12 * B * 4 * H * T * (T + 1) // 2
    assert 1.2e9 < fw < 1.4e9  # the 1.24 GFLOP, up to what each counts
    two_reads = models.train_step_flops("fw_lstm", {}, H, B, T, inner_steps=2, textbook=True)
    assert two_reads - ln == 2 * (fw - ln)
    assert models.train_step_flops("fw_lstm", {"authors_inner_loop": True}, H, B, T, inner_steps=2,
                                   textbook=True) == fw
    # as the models compute it: the vocabulary projected, not every token; nn.LSTM projects every token
    projected = models.train_step_flops("fw_lstm", {"fw_form": "fused"}, H, B, T)
    assert fw - projected == 6 * (B * T - V) * E * 4 * H
    flops = models.train_step_flops
    assert flops("lstm", {}, H, B, T) == flops("lstm", {}, H, B, T, textbook=True)
    assert flops("fw_lstm", {}, H, 1, 9) == flops("fw_lstm", {}, H, 1, 9, textbook=True)  # 9 tokens < V


@pytest.mark.slow  # a benchmark subprocess
def test_models_benchmark_renders_into_the_marked_block(tmp_path, one_thread):
    results, rates = models.bench_hidden_size(4, batch=4, pairs=2, steps=2, configs=models.CONFIGS)
    shapes = {"x W_x [B*T, E] @ [E, 4H]", "h W_h [B, H] @ [H, 4H]", "dz W_h [B, 4H] @ [4H, H]",
              "dW_h [4H, B*T] @ [B*T, H]"}
    assert rates["torch.mm"].keys() == shapes
    expected = {"torch.mm"} | ({"oneDNN"} if matmul.uses_onednn() else set())
    if matmul.sequence_gemm(torch.float32) is not None:
        expected.add("sequence loops' GEMM")
    assert set(rates) == expected
    for r in results:
        assert len(r.flop_limit_rounds_ms) == len(r.flop_limit_best_rounds_ms) == len(r.cpu_rounds_ms) == 2
        assert all(b <= m for b, m in zip(r.flop_limit_best_rounds_ms, r.flop_limit_rounds_ms, strict=True))
    with record("models", {}, kind="models", results_dir=tmp_path) as payload:
        payload["results"] = {
            "matmul_gflops": {"4": rates["torch.mm"]},
            "matmul_gflops_by_library": {"4": rates},
            "steps": [vars(r) for r in results],
            "targets": models.targets(results),
        }
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- render:models -->\nstale\n<!-- /render:models -->\n"
        "<!-- render:absent -->\nhow to produce it\n<!-- /render:absent -->\nend\n"
    )
    cli = [sys.executable, str(BENCH / "render.py"), "--doc", str(doc), "--results", str(tmp_path)]
    assert subprocess.run([*cli, "--check"], capture_output=True).returncode == 1  # stale
    assert subprocess.run(cli, capture_output=True).returncode == 0
    text = doc.read_text()
    assert "stale" not in text and "how to produce it" in text and text.startswith("intro\n")
    assert "| 4 | fw_lstm | fw_form=fused |" in text and "cell_form=fused" in text
    assert "| 4 | torch.mm |" in text and ("| 4 | oneDNN |" in text) == matmul.uses_onednn()
    assert ("| 4 | sequence loops' GEMM |" in text) == ("sequence loops' GEMM" in expected)
    assert subprocess.run([*cli, "--check"], capture_output=True).returncode == 0


def test_every_kind_of_result_has_a_renderer():
    sweep = {
        "trials": 200,
        "epochs": 1,
        "steps_per_epoch": 12,
        "pairs": 2,
        "concurrent": 2,
        "cores": 2,
        "server": "cold",
        "train_s": 32.0,
        "train_s_per_trial": 0.16,
        "wall_s": 40.0,
        "utilisation": 0.4,
        "overhead_core_s_per_trial": 0.24,
        "tune_wall_s": 30.0,
        "tune_utilisation": 0.53,
        "tune_overhead_core_s_per_trial": 0.14,
        "fixed_cost_s": 10.0,
    }
    search = {
        "target": 0.95, "trials": 40,
        "strategies": {"tpe+asha": [{"seed": 0, "epochs_to_target": 5, "total_epochs": 20, "best": 0.99,
                                     "trials": 7}]},
        "efficiency": {"ratio": 0.41, "ci_low": 0.2, "ci_high": 0.7, "censored_at": 48, "seeds": 10},
    }
    profile = {"trials": 200, "wall_s": 75.0, "samples": 3400, "rate_hz": 50, "driver_cpu_s": 68.0,
               "groups": {"Tune's event loop: the rest": 1200}, "other_threads": {"PythonGCThread": 190}}
    tracking = {
        "reports": 2,
        "fields": 18,
        "seconds_per_report": {"stock": [0.1, 0.2], "fwsweep": [0.01, 0.02], "fwsweep_server_down": [0.0]},
    }
    gpu_results = {
        "steps": [
            {
                "model": "fw_lstm",
                "options": "fw_form=fused",
                "hidden_size": 100,
                "batch": 128,
                "length": 19,
                "ms": 3.0,
                "peak_mib": 20.0,
            }
        ],
        "sharing": [
            {
                "processes": 1,
                "steps_per_s_per_trial": 300.0,
                "steps_per_s_total": 300.0,
                "speedup_vs_one": 1.0,
            }
        ],
    }
    fixed = {
        "imports": {"import torch": {"wall_s": 1.9, "cpu_s": 1.8}},
        "mlflow_server": {"new store": {"ready_s": 11.6, "cpu_s": {"uvicorn (the server)": 4.8},
                                        "stop_s": 1.5}},
        "ray": {"init_s": 4.7, "cpu_s": {"raylet": 0.1, "dashboard agent": 1.6}, "shutdown_s": 1.4},
        "sweep": {"trials": 6, "marks": [[2.0, "connect_ray starts"], [9.0, "connect_ray ends"]]},
    }
    base = {
        "started_utc": "t",
        "load_average_before": [0.1] * 3,
        "load_average_after": [0.2] * 3,
        "git_commit": "abc",
        "command": "x",
        "machine": {"cpu_model": "cpu"},
    }
    for kind, results, expected in [
        ("sweep_overhead", sweep, "0.24 core-s"),
        ("sweep_snapshots", {"trials": 200, "runs": [sweep | {"snapshot_rules": "paced", "snapshots": 12,
                                                              "snapshot_s": 0.5, "driver_cpu_s": 6.3}]},
         "sweep/tune_snapshots.py) | 40.0 | 12 | 0.5 | 6.3 | 0.400 | 0.24 | 30.0 (0.530) | 10.0 |"),
        ("sweep_against", {"trials": 200, "against": "0123456789", "runs": [
            sweep | {"package": "0123456 (baseline)", "driver_cpu_s": 9.1},
            sweep | {"package": "this checkout", "driver_cpu_s": 6.3, "wall_s": 30.0}]},
         "| this checkout | 30.0 | 6.3 | 0.400 | 0.24 | 30.0 (0.530) | 10.0 |"),
        ("search_efficiency", search, "0.410**, 95% CI 0.200-0.700"),
        ("driver_profile", profile, "other thread: PythonGCThread"),
        ("tracking", tracking, "10.0x"),
        ("gpu", gpu_results, "3.00"),
        ("fixed_cost", fixed, "1.7 (dashboard agent 1.6, raylet 0.1)"),
        ("fw_ln_bound", [{"hidden": 100, "rows_per_block": 8, "l2_read_gb_s": 240.0, "floor_ms": 7.0,
                          "floor_over_ln_lstm": 1.2, "target_ms": 7.5,
                          "step_ms": {"ln_lstm": 5.8, "fw_lstm": 8.6}, "over_ln_lstm": {"fw_lstm": 1.48},
                          "parts_ms": {"rest over the LN-LSTM": 0.7, "memory traffic beyond L2": 0.3,
                                       "products (memory in L2)": 1.8, "products at the L2 floor": 0.6}}],
         "| 100 | 5.80 | 8.60 | 1.48 | 0.70 | 0.30 | 1.80 | 0.60 | 7.00 | 1.20 | 7.50 | 8 | 240 |"),
        ("allocator", {"rows": [{"model": "fw_lstm", "options": "fw_form=fused", "hidden_size": 100,
                                 "ms_default": 70.0, "ms_kept": 56.0, "ratio": 0.8, "faults_default": 2700.0,
                                 "faults_kept": 0.0}]},
         "| 100 | fw_lstm | fw_form=fused | 70.0 | 56.0 | 0.80 |"),
        ("kernels_ab", {"base_commit": "6521f7f0", "rows": [{"hidden_size": 50, "model": "fw_lstm",
                                                             "base_ms": 35.6, "new_ms": 14.6, "ratio": 0.415,
                                                             "ratio_min": 0.3, "ratio_max": 0.52,
                                                             "rounds": 25}]},
         "| 50 | fw_lstm | 35.60 | 14.60 | 0.415 | 0.30-0.52 |"),
    ]:
        assert expected in render.RENDERERS[kind](base | {"kind": kind, "results": results})


def test_search_efficiency_ratio_is_paired_by_seed_and_counts_a_miss_as_the_whole_budget():
    from search_efficiency import efficiency_ratio

    seeds = {"tpe+asha": [{"epochs_to_target": e} for e in (5, 10, None, 6)],
             "random+fifo": [{"epochs_to_target": e} for e in (20, 30, 40, None)]}
    eff = efficiency_ratio(seeds, budget=48)
    assert eff["ratio"] == pytest.approx((5 + 10 + 48 + 6) / (20 + 30 + 40 + 48))
    assert eff["ci_low"] <= eff["ratio"] <= eff["ci_high"] and eff["seeds"] == 4


def _searches(first: int, n: int) -> list[dict]:
    """Seeds first .. first + n - 1 of one strategy, as search_efficiency.py records them."""
    return [{"seed": s, "epochs_to_target": 10 + s, "total_epochs": 40, "best": 0.99, "trials": 4}
            for s in range(first, first + n)]


def _earlier_run(**results) -> dict:
    """An earlier search_efficiency run's JSON (commit aaa, `first`), at issue 14's settings."""
    return {"command": "first", "git_commit": "aaa", "started_utc": "t0", "finished_utc": "t1",
            "load_average_before": [0.1] * 3, "load_average_after": [0.2] * 3, "machine": {"cpu_model": "c"},
            "results": {"target": 0.99, "pairs": 8, "trials": 40, "epochs": 12, "steps_per_epoch": 150,
                        **results}}


def test_search_efficiency_extends_an_earlier_run_with_the_same_settings_only(tmp_path):
    """`--extend`: the earlier file is checked before anything runs (settings, seeds not measured twice);
    the seeds are merged in order, and the table names each run's seeds and provenance."""
    import argparse

    from search_efficiency import earlier_run, with_earlier_seeds

    earlier = _earlier_run(wall_s=3600.0,
                           strategies={"tpe+asha": _searches(0, 3), "random+fifo": _searches(0, 3)})
    path = tmp_path / "search_efficiency.json"
    path.write_text(json.dumps(earlier))
    args = argparse.Namespace(extend=path, target=0.99, pairs=8, trials=40, epochs=12, steps=150,
                              first_seed=3, seeds=2, bootstrap_count=0)
    assert earlier_run(args)["command"] == "first"
    with pytest.raises(SystemExit, match="--epochs 12 \\(not 6\\)"):
        earlier_run(argparse.Namespace(**vars(args) | {"epochs": 6}))
    with pytest.raises(SystemExit, match="--bootstrap-count 0 \\(not 1\\)"):
        earlier_run(argparse.Namespace(**vars(args) | {"bootstrap_count": 1}))
    with pytest.raises(SystemExit, match="already has seeds \\[2\\]: set --first-seed 3"):
        earlier_run(argparse.Namespace(**vars(args) | {"first_seed": 2}))
    path.write_text("{")
    with pytest.raises(SystemExit, match="not a search_efficiency result"):
        earlier_run(args)

    merged, runs = with_earlier_seeds({"tpe+asha": _searches(3, 2), "random+fifo": _searches(3, 2)}, earlier)
    assert [s["seed"] for s in merged["tpe+asha"]] == [0, 1, 2, 3, 4]
    assert [(r["git_commit"], r["seeds"], r["wall_s"]) for r in runs] == [("aaa", [0, 1, 2], 3600.0)]
    page = render.render_search_efficiency({
        **earlier, "command": "second", "git_commit": "bbb",
        "results": {**earlier["results"], "strategies": merged, "earlier_runs": runs,
                    "seeds_this_run": [3, 4]}})
    assert "Seeds 0-2: *Measured t0" in page and "commit aaa; `first`" in page
    assert "Seeds 3-4: *Measured t0" in page and "commit bbb; `second`" in page
    assert render.seed_ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"


def test_search_efficiency_pairs_with_an_earlier_runs_random_searches(tmp_path):
    """`--pair-with`: the random+fifo searches of the same seeds come from an earlier file with the same
    settings (every seed there, or an error before anything runs), and the table says where from."""
    import argparse

    from search_efficiency import paired_searches, paired_with

    earlier = _earlier_run(wall_s=60.0, seeds_this_run=[0, 1, 2, 3],
                           strategies={"tpe+asha": _searches(0, 4), "random+fifo": _searches(0, 4)})
    path = tmp_path / "search_efficiency.json"
    path.write_text(json.dumps(earlier))
    args = argparse.Namespace(pair_with=path, target=0.99, pairs=8, trials=40, epochs=12, steps=150,
                              first_seed=2, seeds=2)
    paired = paired_searches(args)
    assert [s["seed"] for s in paired["searches"]] == [2, 3] and paired["git_commits"] == ["aaa"]
    with pytest.raises(SystemExit, match="no random\\+fifo search of seeds \\[4, 5\\]"):
        paired_searches(argparse.Namespace(**vars(args) | {"first_seed": 4}))
    with pytest.raises(SystemExit, match="use the same settings"):
        paired_searches(argparse.Namespace(**vars(args) | {"target": 0.95}))
    source = paired_with(paired, None)
    page = render.render_search_efficiency({
        **earlier, "results": {**earlier["results"], "paired_with": source, "bootstrap_count": 1,
                               "strategies": {"tpe+asha": _searches(2, 2),
                                              "random+fifo": paired["searches"]}}})
    assert "searches from `search_efficiency.json` (commits aaa)" in page and "bootstrap_count: 1" in page


@pytest.mark.slow  # a benchmark subprocess that compiles kernel libraries (at -O1)
def test_kernels_ab_times_a_base_commits_kernels_against_the_working_trees(tmp_path):
    from test_models import quick_compiler  # noqa: PLC0415 - the -O1 compiler of the kernel tests

    env = {**os.environ, "CC": str(quick_compiler(tmp_path)), "FWSWEEP_KERNEL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(BENCH / "kernels_ab.py"), "--base", "HEAD", "--hidden", "4",
                           "--rounds", "2", "--name", str(tmp_path / "ab")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads((tmp_path / "ab.json").read_text())
    rows = payload["results"]["rows"]
    assert [(r["hidden_size"], r["model"]) for r in rows] == [(4, "fw_lstm"), (4, "ln_lstm"), (4, "fw_rnn")]
    assert all(r["base_ms"] > 0 and r["new_ms"] > 0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
               for r in rows)
    assert payload["kind"] == "kernels_ab" and len(payload["results"]["base_commit"]) == 40
    assert "| 4 | fw_rnn |" in render.RENDERERS["kernels_ab"](payload)


def test_committed_docs_match_the_committed_results():
    """docs/benchmarks.md says only what benchmarks/results/*.json recorded."""
    assert render.render(render.DOC.read_text()) == render.DOC.read_text(), "run benchmarks/render.py"


def test_gpu_grid_varies_one_axis_at_a_time():
    points = gpu.grid(gpu.SWEEPS)
    assert points[0] == gpu.BASE and len(points) == len({tuple(p.values()) for p in points})
    for p in points:
        assert sum(p[k] != gpu.BASE[k] for k in gpu.BASE) <= 1
    assert gpu.too_big("fw_lstm", {"fw_form": "matrix"}, {"hidden": 400, "batch": 2048, "length": 19})
    assert not gpu.too_big("fw_lstm", {"fw_form": "fused"}, {"hidden": 400, "batch": 2048, "length": 19})


def test_gpu_benchmark_runs_its_whole_grid_and_sharing_test_on_the_cpu():
    """The script's own path, on the CPU with one tiny point, so a GPU lease is not spent finding its bugs:
    every form builds and steps (no C-kernel switch among them: those are CPU-only), a zero budget leaves
    the later points untimed, and the spawned sharing processes report."""
    tiny = {"hidden": 6, "batch": 4, "length": 7}
    assert gpu.FORMS and all(models.NATIVE not in options for _, options in gpu.FORMS)
    forms = gpu.FORMS + gpu.GRAPHED_FORMS
    graphed = gpu.GRAPHED_FORMS
    assert graphed and all(o[gpu.GRAPH] == "on" and o.get("fw_form") != "matrix" for _, o in graphed)
    rows, untimed = gpu.time_grid([tiny], steps=2, budget_s=None, device="cpu")
    assert [(r["model"], r["options"]) for r in rows] == [(n, models.options_label(o)) for n, o in forms]
    assert untimed == [] and all(r["ms"] > 0 and r["peak_mib"] is None for r in rows)
    rows, untimed = gpu.time_grid([tiny, tiny | {"hidden": 8}], steps=1, budget_s=0.0, device="cpu")
    assert len(rows) == len(forms) and untimed == [tiny | {"hidden": 8}]
    shared = gpu.sharing(tiny, [1, 2], seconds=0.5, device="cpu", graphed=True)
    assert [s["processes"] for s in shared] == [1, 2] and shared[0]["speedup_vs_one"] == 1.0
    assert all(s["cuda_graph"] for s in shared)
    assert all(s["steps_per_s_per_trial"] > 0 for s in shared)


@pytest.mark.slow  # a benchmark subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_benchmark_fails_clearly_without_cuda():
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_fw_ln_bound_counts_the_products_the_flop_count_counts_and_its_variants_match_the_kernels():
    """The floor's product FLOPs are models.py's fast-weight FLOPs (12 D per read and stored vector), and
    every line the benchmark's variants replace is still in the kernels' source, once (else it would time
    a build that is not the one shipped)."""
    from fw_ln_bound import MEMORY_IN_L2, WITHOUT_PRODUCTS, product_macs, product_rows
    from models import train_step_flops

    from sweep.models import native

    H, B, T = 50, 4, 19
    with_reads = train_step_flops("fw_lstm", {}, H, B, T)
    no_reads = train_step_flops("ln_lstm", {}, H, B, T)
    assert 2 * B * product_macs(T, 4 * H) == with_reads - no_reads
    assert product_rows(T, pending=0) == 2 * T * T  # every step sums every later read's rows
    # T = 19, pending = 3: dots 190 + 190; anchors at t = 18, 14, 10, 6, 2 (0 + 8 + 16 + 24 + 32 rows),
    # the steps between 0, 2, 4 rows (t = 1, 0: 0, 2)
    assert product_rows(T) == 190 + 190 + 80 + 4 * (0 + 2 + 4) + 2
    assert "#define PENDING_DV 3\n" in native.SOURCE  # the count above follows the kernels' setting
    for old, _ in WITHOUT_PRODUCTS + MEMORY_IN_L2:
        assert native.SOURCE.count(old) == 1, old
