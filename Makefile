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

.PHONY: setup data venv run run-local rehearse study test bench paper-mini clean
setup: data venv

data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/tuxpaint/stamps ] || \
	    [ ! -d /usr/share/openclipart/png ] || [ ! -d /usr/share/openclipart/svg ] || \
	    ! command -v chromium >/dev/null; then \
	  echo "installing Debian data packages: $(DATA_PKGS)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DATA_PKGS) >/dev/null; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m mmlg_ray.prebuild || true
	@touch $@

run: setup
	./scripts/run_local_job.sh

run-local: setup
	$(PY) jobs/sweep.py --config configs/local.yaml --backend local

# the autoscaling rehearsal (jobs/rehearse.py): cluster.yaml's node types as fake nodes on this machine, the
# local default submitted with `ray job submit`, one spot node preempted mid-sweep, the scale-down watched.
# Timeline, checks and report in runs/rehearsal/ (an earlier rehearsal there is deleted first)
rehearse: setup
	rm -rf runs/rehearsal
	RAY_USAGE_STATS_ENABLED=0 $(PY) jobs/rehearse.py --config configs/local.yaml --output runs/rehearsal

# the CPU study (configs/study_cpu.yaml): all seven methods, fixed and elastic extraction, PT+FT's budget
# ladder, 3 seeds; at most 75 minutes on 2 cores. Results and report in runs/study_cpu/
study: setup
	RAY_USAGE_STATS_ENABLED=0 $(PY) jobs/sweep.py --config study_cpu

test: setup
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q --durations=15

bench: setup
	$(PY) benchmarks/extraction_throughput.py

# configs/paper_vitb16.yaml's code path in miniature on this CPU (random-weight ViT-B-16 ancestor,
# webdataset shards written from the packaged data, bf16, ZeRO-3 on 2 workers, two widths)
paper-mini: setup
	RAY_USAGE_STATS_ENABLED=0 $(PY) benchmarks/paper_miniature.py

clean:
	rm -rf $(VENV) runs
