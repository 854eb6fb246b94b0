# Two commands on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch wheel these machines carry locally (CPU build). `make install TORCH=` keeps your own torch.
TORCH  ?= torch==2.13.0
MODEL  ?= models/olmoe-small
# Debian packages the tests and the bench use when present: fio (SSD cross-check), chromium (report test).
SYSTEM_PACKAGES ?= fio chromium

.PHONY: install system-deps test lint bench clean

$(BIN)/harness: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[test,cluster]"
	@touch $(BIN)/harness

install: $(BIN)/harness

# Best effort: installs the missing packages where apt-get and root are available; tests that need
# them skip with a reason otherwise.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
			|| echo "could not install$$missing: the tests that need them will skip"; \
	fi

# The linters and the type checker first (configured in pyproject.toml), then the tests.
test: lint system-deps
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy

bench: install system-deps
	$(BIN)/python -m harness.bench --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
