# Set-up and main entry points. `make bench` and `make test` each create .venv and install everything
# they need on a fresh machine; torch==2.13.0 is installed first so pip does not pull a CUDA build.
PYTHON_SYSTEM ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INVARBENCH := $(VENV)/bin/invarbench
STAMP := $(VENV)/.installed
BENCH_N ?= 100

CHROMIUM := /usr/bin/chromium

.PHONY: install bench test clean browser

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

test: $(STAMP) browser
	$(INVARBENCH) data fetch mnist
	$(PYTHON) -m pytest
	# Regression check on a small subset: the first 100 points of a stored entry, with its settings and seeds.
	$(INVARBENCH) check mnist-cnn-standard__mnist__perturbation --points 100 --no-progress

clean:
	rm -rf $(VENV) build *.egg-info
