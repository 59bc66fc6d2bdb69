# Two commands: `make demo` runs the main job on a synthetic checkpoint, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: test demo lint plans bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check pipeline loader runtime tests bench
	$(PY) -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m pipeline.synth $(DEMO)/checkpoint --preset tiny
	$(VENV)/bin/mimo-shard $(DEMO)/checkpoint $(DEMO)/out --devices 4
	$(VENV)/bin/mimo-manifest show $(DEMO)/out
	$(VENV)/bin/mimo-manifest verify $(DEMO)/out
	$(VENV)/bin/mimo-run $(DEMO)/out --prompt "The river ran low that summer, and" \
	    --max-new-tokens 24 --temperature 0.8 --seed 1 --json

plans: $(STAMP)
	for n in 32 64; do \
	  $(PY) -m pipeline.cli --dry-run --config manifests/mimo-v2-flash/config.json --devices $$n --workers 4 \
	    > manifests/mimo-v2-flash/dry-run-$$n.txt; \
	  $(PY) -m pipeline.cli --dry-run --config manifests/mimo-v2-flash/config.json --devices $$n --workers 4 --json \
	    > manifests/mimo-v2-flash/dry-run-$$n.json; \
	done

lint: $(STAMP)
	$(PY) -m ruff check pipeline loader runtime tests bench

clean:
	rm -rf $(VENV) $(DEMO) bench-out .pytest_cache .ruff_cache *.egg-info
