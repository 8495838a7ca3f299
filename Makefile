# `make test` is what CI runs (.ci/run); `make demo` runs the example without a broker.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck unit demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict heartbeat_consumer

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

demo: $(STAMP)
	mkdir -p .demo
	$(BIN)/heartbeat-consumer validate examples/cack.heartbeat.json
	$(BIN)/heartbeat-consumer plan examples/cack.heartbeat.json --state .demo/cack.state.json
	$(BIN)/heartbeat-consumer run --local examples/cack.heartbeat.json --state .demo/cack.state.json --every 2s --max-ticks 3
	$(BIN)/heartbeat-consumer status examples/cack.heartbeat.json --state .demo/cack.state.json

clean:
	rm -rf $(VENV) $(PEERS) .demo .mypy_cache .ruff_cache .pytest_cache .hypothesis

# Benchmarks against the RabbitMQ of `make test` (RABBIT_URL or localhost); about 15 minutes.
# They print tables; bench/results.md records a run. Not part of `make test`. The peers
# measured beside us (Celery) go into an environment of their own, bench/.peers.
PEERS := bench/.peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): bench/peers.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet -r bench/peers.txt
	touch $(PEERS_STAMP)

bench: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python bench/bench_evaluate.py
	$(BIN)/python bench/bench_bus.py
	$(BIN)/python bench/bench_fleet_memory.py
	$(BIN)/python bench/bench_monitor_memory.py
