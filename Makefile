# Two commands on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch wheel these machines carry locally (CPU build). `make install TORCH=` keeps your own torch.
TORCH  ?= torch==2.13.0
MODEL  ?= models/olmoe-small

.PHONY: install test lint bench clean

$(BIN)/harness: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(BIN)/harness

install: $(BIN)/harness

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m harness.bench --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
