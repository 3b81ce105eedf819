# Two commands on a fresh machine:   make run    (the main job on its embedded default)
#                                    make test   (the test suite)
# Each installs what it needs: Debian data packages, a venv with pinned wheels.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: the data the default run reads, and chromium (headless), which the report's test opens
DATA_PKGS := dataset-fashion-mnist tuxpaint-stamps-default openclipart-png openclipart-svg chromium

.PHONY: setup data venv lock run run-local rehearse study test test-fast lint bench bench-scale paper-mini clean
setup: data venv

data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/tuxpaint/stamps ] || \
	    [ ! -d /usr/share/openclipart/png ] || [ ! -d /usr/share/openclipart/svg ] || \
	    ! command -v chromium >/dev/null; then \
	  echo "installing Debian data packages: $(DATA_PKGS)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DATA_PKGS) >/dev/null; \
	fi

venv: $(VENV)/.installed
# requirements.lock: every package with its hashes (`make lock` writes it from requirements.txt);
# pip installs nothing that is not in it (--require-hashes), then the project itself without deps.
$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m mmlg_ray.prebuild || true
	@touch $@

# Regenerate the locks after editing requirements.txt or pyproject.toml's dependencies, then commit them:
#   requirements.lock          requirements.txt, fully pinned with hashes (CPU machines, CI, `make setup`)
#   requirements-cluster.lock  pyproject.toml's dependencies + [s3,mlflow] at requirements.lock's versions
#                              (cluster.yaml's GPU nodes); botocore alone is left free, s3fs's own (the
#                              tested lock's botocore is moto's, a test-only package)
# uv (pinned) runs from a throwaway venv; existing pins are kept unless requirements.txt moves them
# (add --upgrade-package NAME to the first compile to move one). Linux x86_64, CPython 3.11 wheels.
UV_VERSION := 0.13.9
UV_VENV := build/uv-$(UV_VERSION)
UV_COMPILE = $(UV_VENV)/bin/uv pip compile -q --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"
lock:
	@test -x $(UV_VENV)/bin/uv || { $(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q uv==$(UV_VERSION); }
	$(UV_COMPILE) requirements.txt -o requirements.lock
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' requirements.lock | grep -v -E '^botocore==' > build/tested-pins.txt
	$(UV_COMPILE) pyproject.toml --extra s3 --extra mlflow -c build/tested-pins.txt -o requirements-cluster.lock

run: setup
	./scripts/run_local_job.sh

run-local: setup
	$(PY) jobs/sweep.py --config configs/local.yaml --backend local

# the autoscaling rehearsal (jobs/rehearse.py): cluster.yaml's node types as fake nodes on this machine, the
# local default submitted with `ray job submit`, spot nodes preempted mid-trial (one drained on its notice by the
# spot watcher, one killed without notice), the scale-down watched.
# Timeline, checks and report in runs/rehearsal/ (an earlier rehearsal there is deleted first)
rehearse: setup
	rm -rf runs/rehearsal
	RAY_USAGE_STATS_ENABLED=0 $(PY) jobs/rehearse.py --config configs/local.yaml --output runs/rehearsal

# the CPU study (configs/study_cpu.yaml): all seven methods, fixed and elastic extraction, PT+FT's budget
# ladder, 3 seeds; at most 75 minutes on 2 cores. Results and report in runs/study_cpu/
study: setup
	RAY_USAGE_STATS_ENABLED=0 $(PY) jobs/sweep.py --config study_cpu

# the linter first, then the whole suite (CI runs exactly this)
test: setup lint
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q --durations=15

# the fast lane: every test that starts no Ray and runs no sweep in a subprocess
test-fast: setup
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -m "not slow" --durations=10

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/extraction_throughput.py

# a sweep of the paper grid's trial count (1,512 micro-model trials) with its output on a loopback S3
# server that counts what it is sent: wall time, driver peak memory, bytes and puts (docs/results.md);
# benchmarks/sweep_scale.py --trials 40 / 160 is the N-to-4N check (~1 and ~2 minutes)
bench-scale: setup
	RAY_USAGE_STATS_ENABLED=0 $(PY) benchmarks/sweep_scale.py --trials 1512 --json runs/bench/sweep_scale-1512.json

# configs/paper_vitb16.yaml's code path in miniature on this CPU (random-weight ViT-B-16 ancestor,
# webdataset shards written from the packaged data, bf16, ZeRO-3 on 2 workers, two widths)
paper-mini: setup
	RAY_USAGE_STATS_ENABLED=0 $(PY) benchmarks/paper_miniature.py

clean:
	rm -rf $(VENV) runs
