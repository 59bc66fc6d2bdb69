# Two commands: `make demo` runs the main job on a synthetic checkpoint, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: test demo lint plans bench clean trace

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The demo needs the runtime dependencies only (no torch, no transformers): same .venv, own stamp.
DEMO_STAMP := $(VENV)/.installed-demo

$(DEMO_STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(DEMO_STAMP)

# The tests run on every core, at most 4 (each worker imports torch and builds its own fixtures).
test: $(STAMP)
	$(PY) -m ruff check mimo pipeline loader runtime tests bench
	$(PY) -m pytest -q -n auto --maxprocesses 4

demo: $(DEMO_STAMP)
	rm -rf $(DEMO)
	$(PY) -m pipeline.synth $(DEMO)/checkpoint --preset tiny
	$(VENV)/bin/mimo-shard $(DEMO)/checkpoint $(DEMO)/out --devices 4
	$(VENV)/bin/mimo-manifest show $(DEMO)/out
	$(VENV)/bin/mimo-manifest verify $(DEMO)/out
	$(VENV)/bin/mimo-run $(DEMO)/out --prompt "The river ran low that summer, and" \
	    --max-new-tokens 24 --temperature 0.8 --seed 1 --json

PLAN := $(PY) -m pipeline.cli --dry-run --config manifests/mimo-v2-flash/config.json --workers 4

plans: $(STAMP)
	for n in 32 64; do \
	  $(PLAN) --devices $$n > manifests/mimo-v2-flash/dry-run-$$n.txt; \
	  $(PLAN) --devices $$n --json > manifests/mimo-v2-flash/dry-run-$$n.json; \
	  $(PLAN) --devices $$n --expert-dtype float8_e4m3fn > manifests/mimo-v2-flash/dry-run-$$n-fp8.txt; \
	  $(PLAN) --devices $$n --expert-dtype float8_e4m3fn --json > manifests/mimo-v2-flash/dry-run-$$n-fp8.json; \
	done

lint: $(STAMP)
	$(PY) -m ruff check mimo pipeline loader runtime tests bench

# Trace every device kernel with the real nkipy (no compiler, no device): a separate
# virtualenv, because nkipy comes from a source checkout, e.g. make trace NKIPY_SRC=../nkipy
TRACE_VENV  := .venv-trace
TRACE_PY    := $(TRACE_VENV)/bin/python
TRACE_STAMP := $(TRACE_VENV)/.installed
NKIPY_SRC   ?=

$(TRACE_STAMP): setup.cfg pyproject.toml $(wildcard $(NKIPY_SRC)/nkipy/pyproject.toml)
	@test -n "$(NKIPY_SRC)" || { echo "make trace: set NKIPY_SRC to a checkout of github.com/aws-neuron/nkipy"; exit 2; }
	@test -f "$(NKIPY_SRC)/nkipy/src/nkipy/core/trace.py" || { echo "make trace: NKIPY_SRC=$(NKIPY_SRC) is not an nkipy checkout (no nkipy/src/nkipy/core/trace.py)"; exit 2; }
	test -x $(TRACE_PY) || $(PYTHON) -m venv $(TRACE_VENV)
	$(TRACE_PY) -m pip install --quiet --disable-pip-version-check -e . numpy pytest protobuf grpcio-tools
	$(TRACE_PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation "$(NKIPY_SRC)/nkipy"
	$(TRACE_PY) -c "import nkipy.core.trace"
	touch $(TRACE_STAMP)

trace: $(TRACE_STAMP)
	$(TRACE_PY) bench/trace.py

clean:
	rm -rf $(VENV) $(DEMO) bench-out .pytest_cache .ruff_cache *.egg-info
