# Two entry points: `make demo` (install, then run the main job on the tiny zoo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev,ray]'
	touch $@

install: $(BIN)/.installed
	@echo "music, prefect and ray are in $(BIN): run 'source $(BIN)/activate' in a shell to put them on PATH"

demo: install
	$(BIN)/music zoo build
	$(BIN)/music pipeline data_specs/train_tiny.yaml
	@echo "next: 'source $(BIN)/activate', then the README's Commands and Operations"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
