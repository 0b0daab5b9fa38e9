# Tunnelplane. `make help` lists the targets. Every target sets up what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# The Kubernetes release deploy/ and the provisioner's requests are validated against: the
# oldest minor still supported upstream (lightkube-models in pyproject.toml matches it).
KUBERNETES_VERSION := 1.35.0
MANIFESTS := $(filter-out deploy/kustomization.yaml,$(sort $(wildcard deploy/*.yaml)))
PROTOS := $(shell find proto/tunnelplane -name '*.proto' | sort)
GRPC_INCLUDE = $(shell $(BIN)/python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

LOCK := requirements.lock
# uv resolves the lock for every platform (markers) with the hashes of every file of each
# pinned release; pip installs from it with --require-hashes.
LOCK_COMPILE = $(BIN)/uv pip compile pyproject.toml --extra dev --universal --generate-hashes \
  --python-version 3.11 --custom-compile-command 'make lock'

.PHONY: help install lock check-lock generate check-generated lint lint-deploy lint-alerts typecheck test run migrate bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install exactly the versions in requirements.lock (idempotent)

# Exactly the pinned releases, each checked against its hash; then the project itself,
# built with the locked setuptools (no isolated build that would fetch an unpinned one).
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

lock: $(STAMP) ## Re-resolve requirements.lock after a change to pyproject.toml (LOCK_ARGS=--upgrade: newest releases)
	$(LOCK_COMPILE) $(LOCK_ARGS) -o $(LOCK)
	$(MAKE) install

check-lock: $(STAMP) ## Fail if requirements.lock no longer satisfies pyproject.toml
	@cp $(LOCK) $(VENV)/lock-check.txt
	@$(LOCK_COMPILE) --quiet -o $(VENV)/lock-check.txt
	@if ! diff -q $(LOCK) $(VENV)/lock-check.txt >/dev/null; then \
	  diff -u $(LOCK) $(VENV)/lock-check.txt | head -40; \
	  echo "requirements.lock is stale: run 'make lock' and commit it"; exit 1; fi
	@echo "requirements.lock matches pyproject.toml"

$(BUF):
	mkdir -p .tools
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

generate: $(STAMP) ## Regenerate generated/ from proto/ (Python, .pyi, descriptor set)
	rm -rf generated/tunnelplane generated/tunnelplane.binpb
	mkdir -p generated/tunnelplane
	$(BIN)/python -m grpc_tools.protoc -I proto -I $(GRPC_INCLUDE) \
	  --python_out=generated --grpc_python_out=generated \
	  --mypy_out=generated --mypy_grpc_out=generated \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --descriptor_set_out=generated/tunnelplane/descriptors.binpb --include_imports --include_source_info \
	  $(PROTOS)
	find generated/tunnelplane -type d -exec touch {}/__init__.py \; -exec touch {}/py.typed \;

check-generated: generate ## Regenerate and fail if generated/ differs from what is committed
	@git add -N generated >/dev/null 2>&1 || true
	@if ! git diff --quiet --exit-code -- generated; then \
	  git diff --stat -- generated; echo "generated/ is stale: run 'make generate' and commit it"; exit 1; fi
	@echo "generated/ is up to date"

lint: $(STAMP) $(BUF) ## ruff (lint + format check); buf lint, format check and breaking check against main; deploy/ against the Kubernetes schema; the alert rules with promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BUF) lint
	$(BUF) format --diff --exit-code
	BUF=$(BUF) .ci/buf-breaking
	$(MAKE) --no-print-directory lint-deploy
	$(MAKE) --no-print-directory lint-alerts

# kubernetes-validate ships the schemas (offline). --quiet prints only problems, and a kind
# it has no schema for is only a warning to it, so any output at all fails the target.
lint-deploy: $(STAMP) ## Validate deploy/*.yaml (strict) against the Kubernetes $(KUBERNETES_VERSION) schema, offline
	@test -n "$(MANIFESTS)" || { echo "no manifests in deploy/"; exit 1; }
	@out=$$($(BIN)/kubernetes-validate --strict --quiet -k $(KUBERNETES_VERSION) $(MANIFESTS) 2>&1); \
	  rc=$$?; if [ $$rc -ne 0 ] || [ -n "$$out" ]; then echo "$$out"; exit 1; fi
	@echo "deploy/: $(words $(MANIFESTS)) files valid against Kubernetes $(KUBERNETES_VERSION) (strict)"

lint-alerts: ## Check deploy/prometheus/alerts.yml with promtool and run its unit tests (Debian's prometheus package brings promtool)
	@command -v promtool >/dev/null || (apt-get install -y -q prometheus >/dev/null || sudo apt-get install -y -q prometheus >/dev/null)
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml

typecheck: $(STAMP) ## mypy --strict on server/ and gateway/
	$(BIN)/mypy

test: $(STAMP) ## Run the test suite (PostgreSQL and Redis legs run when reachable; required when CI=true)
	$(BIN)/pytest $(PYTEST_ARGS)

run: $(STAMP) ## Migrate and start the server on embedded defaults (SQLite, in-process state)
	$(BIN)/python -m server migrate
	$(BIN)/python -m server serve

migrate: $(STAMP) ## Apply database migrations (TP_DATABASE_URL)
	$(BIN)/python -m server migrate

bench: $(STAMP) ## Load benchmarks with h2load on loopback; writes bench/results/
	@command -v h2load >/dev/null || (apt-get install -y -q nghttp2-client >/dev/null || sudo apt-get install -y -q nghttp2-client >/dev/null)
	@command -v wrk >/dev/null || (apt-get install -y -q wrk >/dev/null || sudo apt-get install -y -q wrk >/dev/null)
	$(BIN)/python -m bench.run

clean: ## Remove the virtualenv, tools and local data
	rm -rf $(VENV) .tools var .mypy_cache .ruff_cache .pytest_cache
