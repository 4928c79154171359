# Works from a fresh clone on a machine with only Python >= 3.10: creates .venv, installs the
# CPU torch wheel first (so no CUDA packages are pulled), then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TEST_ARGS ?=

.PHONY: venv install test lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

venv install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests cachellm_rl tune_spaces --doctest-modules $(TEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy cachellm_rl tune_spaces

# The install is timed apart from the demo itself.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory install; \
	echo "install took $$(( $$(date +%s) - start )) s"
	$(PY) experiments/demo.py

bench: $(VENV)/.installed
	$(PY) experiments/bench_cache.py --json results/bench_cache.json
	$(PY) experiments/bench_throughput.py --json results/bench_throughput.json

clean:
	rm -rf $(VENV) artifacts results .pytest_cache .ruff_cache
