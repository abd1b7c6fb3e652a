# Two entry points a new user needs (see README): `make quickstart` and `make test`.
# Both create .venv on first use; on a machine without an NVIDIA GPU they install the CPU build of torch
# first (torch==2.13.0; set TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cpu, where PyPI's
# default wheel for your platform is a CUDA build), so the package's `torch>=2.4` pulls nothing more.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_CPU_VERSION ?= 2.13.0
SPEC ?= search_spaces/quickstart.yaml
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip prints one warning per package for this machine's empty local indexes; hide only those lines.
QUIET_PIP := { grep -v "is ignored: it is neither" || true; }

.PHONY: setup quickstart test test-fast lint bench clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing the default (CUDA) torch build"; \
	else \
	  echo "No GPU found: installing the CPU build of torch $(TORCH_CPU_VERSION)"; \
	  $(PIP) install "torch==$(TORCH_CPU_VERSION)" $${TORCH_INDEX_URL:+--index-url $$TORCH_INDEX_URL} 2>&1 | $(QUIET_PIP); \
	fi
	$(PIP) install -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import sweep, torch, ray, optuna, mlflow" 
	touch $@

quickstart: setup
	$(VENV)/bin/sweep run $(SPEC)

# Everything, what CI runs: real Ray, real MLflow servers, subprocesses, training to target accuracies.
# Two pytest-xdist workers: most of a test's time is waiting on a server or Ray, so two overlap well on
# 2 cores (tests sharing a module's cluster stay in one worker: tests/conftest.py). On a fresh machine the
# venv (pip) and the browser (apt) install side by side. --durations: where the suite's time goes, per run.
test:
	$(MAKE) --no-print-directory -j2 setup browser
	$(VENV)/bin/ruff check sweep tests benchmarks
	$(PY) -m pytest -q -rs -n 2 --dist loadgroup --durations=15 tests

# Everyday work: in-process tests only (no Ray, no MLflow server: `slow` tests are left out).
test-fast: setup
	$(VENV)/bin/ruff check sweep tests benchmarks
	$(PY) -m pytest -q -rs -m "not slow" tests

# The MLflow UI test (tests/test_ui_browser.py) drives Debian's headless Chromium. As root, install it when
# missing; when that fails (no apt, no network) the test skips and says why.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! test -x /usr/bin/chromedriver; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium + chromium-driver for the browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	      >/dev/null 2>&1 || echo "could not install chromium: the browser test will skip"; \
	  else echo "no chromium/chromedriver: the browser test will skip (apt-get install chromium chromium-driver)"; \
	  fi; \
	fi

# ruff check (its rules, line length 110); the code is wrapped by hand, not by `ruff format`.
lint: setup
	$(VENV)/bin/ruff check sweep tests benchmarks

clean:
	rm -rf $(VENV) fwsweep-runs .pytest_cache
