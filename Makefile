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
	$(PY) -m ruff check pipeline loader runtime tests
	$(PY) -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m pipeline.synth $(DEMO)/checkpoint --preset tiny

lint: $(STAMP)
	$(PY) -m ruff check pipeline loader runtime tests

clean:
	rm -rf $(VENV) $(DEMO) bench-out .pytest_cache .ruff_cache *.egg-info
