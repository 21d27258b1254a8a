# lmps — make targets. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PROTO_SRC := $(wildcard protos/lmps/v1/*.proto)

.PHONY: help venv proto demo test test-fast lint typecheck bench clean image docker-test

help:  ## List targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(BIN)/.installed  ## Create .venv with pinned dependencies

lmps/v1/.generated: $(PROTO_SRC) $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC)
	touch $@

proto: lmps/v1/.generated  ## Generate Python code from protos/ into lmps/v1/

demo: proto  ## Train the tiny model on a local 2-server, 2-worker cluster, sample, fine-tune a classifier
	$(BIN)/lmps demo

test: proto  ## Run the whole test suite (unit, service, cluster, docker)
	$(BIN)/python -m pytest -q

test-fast: proto  ## Unit and in-process tests only
	$(BIN)/python -m pytest -q -m "not cluster and not docker and not chaos"

lint: proto  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: proto  ## mypy
	$(BIN)/mypy lmps tests bench

bench: proto  ## Benchmarks: ratios against baselines on this machine
	$(BIN)/python -m bench

clean:  ## Remove generated code and local runs
	rm -f lmps/v1/*_pb2*.py lmps/v1/*_pb2*.pyi lmps/v1/.generated
	rm -rf runs .lmps

image:  ## Build the lmps image (deploy/Dockerfile; falls back to an offline build: docs/deploy.md)
	bash deploy/scripts/build-image.sh

docker-test: proto  ## Deployment tests only: compose end-to-end (needs Docker), kustomize/k8s checks
	$(BIN)/python -m pytest -q tests/docker tests/deploy
