# Two commands for a newcomer: `make demo` and `make test`. Both build .venv first.
# TORCH names the torch build to install when the venv has none; on a machine with a GPU, pass e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: setup demo test lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# torch first and explicitly, so a CPU machine never pulls a multi-GB CUDA build as a dependency
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	@# dev: the test tools and the peers the tests compare against (Hugging Face transformers)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/transformer demo

test: setup
	$(PY) -m pytest

# what CI checks besides the tests: ruff's lint and format (configured in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(VENV) demo-run .pytest_cache

bench: setup
	$(PY) -m bench
