# Everything a fresh machine needs, starting from Python and pip.
#   make demo   the main job: set up, then run the router benchmark against Ray's PrefixTree
#   make test   set up, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras, so `make test` after `make demo` installs only what is missing.
$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) install -e ".[dev]"
	touch $@

$(VENV)/.serve: pyproject.toml | $(PY)
	$(PIP) install -e ".[serve,dev]"
	touch $@

demo: $(VENV)/.serve
	$(VENV)/bin/kvroute bench router --json results/bench_router.json

test: $(VENV)/.dev
	$(PY) -m pytest

bench: demo

clean:
	rm -rf $(VENV) results/*.tmp.json .pytest_cache .hypothesis
