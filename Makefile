# EV charging network: the two commands of the quick start are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
KAFKA_PORT ?= 9092

.PHONY: help install kafka-jars lint typecheck test test-fast compose-test run stop clean prereqs-test prereqs-run

help:
	@echo "make run        start Kafka, Central and three CPs on this machine"
	@echo "make stop       stop what 'make run' started"
	@echo "make test       install, lint, type-check and run every test"
	@echo "make test-fast  unit tests only"
	@echo "make compose-test  build the images and start the compose files on Podman (root)"
	@echo "make bench      fleet benchmark of Central (BENCH_ARGS='--sizes 100,1000 --duration 20')"
	@echo "make bench-failover  kills of the active HA Central and the cost of HA (FAILOVER_ARGS='--kills 3')"
	@echo "make bench-secure    the cost of a secured Kafka at 1,000 CPs (SECURE_ARGS='--security-cps 100')"
	@echo "make chaos      random faults and an auditor (DURATION=1800 SEED=7 NET=1 CHAOS_ARGS='--ha')"

# What the machine must have (scripts/prereqs.sh): as root it installs what is missing, otherwise
# it stops the goal at once, before the venv, with one line naming what to install.
prereqs-test prereqs-run:
	@PYTHON=$(PYTHON) scripts/prereqs.sh $(@:prereqs-%=%)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

kafka-jars:
	scripts/kafka.sh jars

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy shared EV_Central EV_CP_E EV_CP_M EV_Driver EV_Registry EV_W init_db.py network_config.py

test: prereqs-test $(STAMP) kafka-jars lint typecheck
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit

# The compose files started for real on rootful Podman (scripts/podman-setup.sh builds the
# images without a registry): all in one, then the three PCs' files. `make test` runs it too.
compose-test: prereqs-test $(STAMP) kafka-jars
	$(PY) -m pytest -m compose tests/compose

run: prereqs-run $(STAMP) kafka-jars
	KAFKA_PORT=$(KAFKA_PORT) PYTHON=$(PY) scripts/run-local.sh start

stop:
	KAFKA_PORT=$(KAFKA_PORT) PYTHON=$(PY) scripts/run-local.sh stop

clean: stop
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache *.egg-info

# The fleet benchmark: writes bench/results.json, bench/results.png and docs/performance.md.
.PHONY: bench bench-failover bench-secure
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=
# The failover section (about 10 minutes here, so not part of `make bench`): ten kills of the active
# Central at 1,000 CPs, then 5,000 CPs against one broker and one Central and against the
# three-node cluster and the HA pair. Adds its figures to bench/results.json and the report.
FAILOVER_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: prereqs-run $(BENCH_STAMP) kafka-jars
	$(PY) -m bench.run $(BENCH_ARGS)

bench-failover: prereqs-run $(BENCH_STAMP) kafka-jars
	$(PY) -m bench.run --failover $(FAILOVER_ARGS)

# The cost of a secured Kafka (TLS, SCRAM logins, ACLs) at 1,000 CPs: plain, then secured, in
# one run (about 5 minutes). Adds its figures to bench/results.json and the report.
SECURE_ARGS ?=
bench-secure: prereqs-run $(BENCH_STAMP) kafka-jars
	$(PY) -m bench.run --kafka-security $(SECURE_ARGS)

# A chaos soak (tools/chaos, docs/reliability.md): random faults from a seed, then the auditor.
# NET=1 runs it on three simulated PCs with network faults too (root).
.PHONY: chaos
DURATION ?= 120
SEED ?=
NET ?=
CHAOS_ARGS ?=
chaos: prereqs-test $(STAMP) kafka-jars
	$(PY) -m tools.chaos --duration $(DURATION) $(if $(SEED),--seed $(SEED)) $(if $(NET),--net) $(CHAOS_ARGS)
