# Two commands do everything on a fresh CPU machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Pin the CPU wheel first so no dependency pulls a multi-GB CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install install-dev demo test lint docs clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(VENV)/bin/activate
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[peft,plot]"

install-dev: $(VENV)/bin/activate
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"

demo: install
	$(VENV)/bin/sapo demo --output_dir runs/demo

test: install-dev
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(PY) -m pytest -q --durations=15

lint: install-dev
	$(VENV)/bin/ruff check src tests scripts benchmarks

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on a broken link or a missing page.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs build site src/*.egg-info
