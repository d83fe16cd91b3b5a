# detres: `make demo` sets up and runs the main job on the built-in data; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/demo

.PHONY: setup demo test lint clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	OMP_NUM_THREADS=2 $(PY) tools/demo.py --out $(RUN) --overwrite

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest tests

clean-demo:
	rm -rf $(RUN) data_toy
