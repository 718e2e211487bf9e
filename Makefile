# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is installed first, pinned, so pip takes the CPU wheel where one is offered locally.
# Elsewhere pass the CPU index, e.g. `make test PIP_TORCH_ARGS="--index-url <pytorch cpu index>"`.
TORCH_SPEC     ?= torch==2.13.0
PIP_TORCH_ARGS ?=

.PHONY: demo test test-slow lint bench clean venv image compose-up compose-down

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedctl demo --participants 3 --rounds 10

# The fast suite in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time
# (its module fixtures' nodes stay in one process): most of a test's time is its nodes
# starting and waiting on each other, so two workers take about 0.8 of one's time on 2 cores.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/round_time.py
	$(BIN)/python benchmarks/wire.py
	$(BIN)/python benchmarks/secagg.py
	$(BIN)/python benchmarks/ledger.py
	$(BIN)/python benchmarks/cid.py

# Optional, with a Docker daemon (docs/deploy.md): the image, and the compose federation.
IMAGE ?= fednode:0.1.0
COMPOSE := docker compose -f deploy/compose/compose.yaml

image:
	docker build -t $(IMAGE) .

compose-up:
	FEDNODE_IMAGE=$(IMAGE) $(COMPOSE) up -d --build

compose-down:
	$(COMPOSE) down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
