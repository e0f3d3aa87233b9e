# Set-up and main entry points. `make bench` and `make test` each create .venv and install everything
# they need on a fresh machine; torch==2.13.0 is installed first so pip does not pull a CUDA build.
PYTHON_SYSTEM ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INVARBENCH := $(VENV)/bin/invarbench
STAMP := $(VENV)/.installed
BENCH_N ?= 100

CHROMIUM := /usr/bin/chromium

.PHONY: install bench lint format test test-fast clean browser leaderboard leaderboard-reference device-wheels device-check

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

bench: $(STAMP)
	$(INVARBENCH) data fetch mnist
	$(INVARBENCH) bench --n $(BENCH_N)

# Debian's chromium for the browser test (Playwright is pointed at it and never downloads a browser).
browser:
	@test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
		echo "warning: could not install chromium with apt-get (not root?); the browser test will be skipped"

# Lint: ruff's rules and formatting over the whole tree, and mypy on the core modules (tools/typecheck.py).
# `make test` runs it first, so that CI fails on a finding; `make format` applies ruff's fixes and format.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTHON) tools/typecheck.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint browser
	$(INVARBENCH) data fetch mnist
	$(PYTHON) -m pytest
	# Regression check on a small subset: the first 100 points of one entry of every kind (perturbation with pgd, fmn and aa-fast; each invariance attack with gradient metamers of a robust model; exact metamers), with their settings and seeds.
	$(INVARBENCH) check mnist-cnn-standard__mnist__perturbation mnist-cnn-pgd-linf-0.3__mnist__invariance mnist-firevnet-ice__mnist__invariance --points 100 --no-progress

# The quick unit suite while developing: no MNIST, no browser, nothing slow (markers in pyproject.toml).
test-fast: $(STAMP)
	$(PYTHON) -m pytest -m "not mnist and not browser and not slow"

# The leaderboard's full evaluation (hours on a CPU; not part of `make test`). One resumable run per
# model and track: re-running continues where a killed run stopped, and each finished run is added to
# leaderboard/entries/ at once. Perturbation track: first 1000 test points; invariance track: first 500
# (its PGD at l_inf 0.3/0.4 only sits beside the invariance figures in that run's summary).
RUNS ?= $(HOME)/.cache/invarbench/runs
ZOO ?= mnist-cnn-standard mnist-cnn-pgd-linf-0.1 mnist-firevnet-ce mnist-firevnet-ice mnist-cnn-pgd-l2-2.0 mnist-cnn-pgd-linf-0.3 mnist-cnn-pgd-linf-0.4
# Perturbation track: invarbench's PGD engine at every eps, FMN for the curves, and aa-fast at the headline
# eps on the points both left. The official AutoAttack is not run here: `make leaderboard-reference` runs it
# on each entry's regression subset, and leaderboard/baselines/ holds the stored AutoAttack entries that
# `leaderboard build` compares the regenerated ones with (docs/leaderboard.md).
PERTURBATION := --threat linf:0.1,0.2,0.3,0.4 --threat l2:1.0,2.0 --attack pgd --attack fmn:cascade=false --attack aa-fast:eps=0.3+2.0 --n 1000 --seed 0
INVARIANCE := --threat linf:0.3,0.4 --attack pgd --attack invariance-linf --attack invariance-l0 --attack metameric --n 500 --seed 0
# The spheres models (exact oracle): pgd at the training eps, and the l_inf invariance search, N=1000.
SPHERES ?= spheres-mlp-standard spheres-mlp-pgd-linf
SPHERES_PERTURBATION := --threat linf:0.025 --attack pgd --n 1000 --seed 0
SPHERES_INVARIANCE := --threat linf:0.025 --attack invariance-linf --n 1000 --seed 0
# Jobs run as Ray tasks, one worker per core with one thread each (entries record executor and workers).
RAY := --executor ray --workers $(shell nproc) --threads-per-worker 1

# $(call regenerate,MODELS,PERTURBATION-ARGUMENTS,PERTURBATION-RUN,INVARIANCE-ARGUMENTS,INVARIANCE-RUN): for each
# model, the perturbation run (RUN-MODEL under RUNS) and the invariance run, each added to the entries when done.
define regenerate
set -e; for model in $(1); do \
	$(INVARBENCH) run $$model $(2) $(RAY) --out $(RUNS) --name $(3)-$$model; \
	$(INVARBENCH) leaderboard add $(RUNS)/$(3)-$$model --replace; \
	$(INVARBENCH) run $$model $(4) $(RAY) --out $(RUNS) --name $(5)-$$model; \
	$(INVARBENCH) leaderboard add $(RUNS)/$(5)-$$model --replace --track invariance; \
done
endef

leaderboard: $(STAMP)
	$(INVARBENCH) data fetch mnist
	$(call regenerate,$(ZOO),$(PERTURBATION),zoo-1000,$(INVARIANCE),invariance-500)
	$(call regenerate,$(SPHERES),$(SPHERES_PERTURBATION),spheres-1000,$(SPHERES_INVARIANCE),invariance-1000)
	$(INVARBENCH) leaderboard build $(foreach page,README.md $(sort $(wildcard docs/*.md)),--readme $(page))

# The official AutoAttack (pyautoattack standard) at the headline threats on each zoo model's regression
# subset (its first 200 points): which points it broke that the leaderboard's attacks missed, kept in
# leaderboard/references/ and shown as the tables' reference column.
leaderboard-reference: $(STAMP)
	$(INVARBENCH) data fetch mnist
	$(INVARBENCH) leaderboard reference $(ZOO) --runs $(RUNS)
	$(INVARBENCH) leaderboard build $(foreach page,README.md $(sort $(wildcard docs/*.md)),--readme $(page))

# A lent GPU machine (the device tool) reaches no package registry: `make device-wheels` writes what it
# needs into .device/ (ignored by git): the wheels its image lacks, for Python 3.12, and MNIST packed
# small. There, `make device-check` (benchmarks/device_check.sh) installs them and the project, runs the
# tests marked cuda and the GPU timings, and writes JSON into $(DEVICE_OUT) (the device tool's $$OUT).
# `python benchmarks/report.py` turns the JSON, copied to benchmarks/results/, into docs/speed.md's tables.
DEVICE_OUT ?= $(if $(OUT),$(OUT),benchmarks/results/device)

device-wheels: $(STAMP)
	$(INVARBENCH) data fetch mnist
	$(PYTHON) benchmarks/device_wheels.py

device-check:
	bash benchmarks/device_check.sh --out $(DEVICE_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
