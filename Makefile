# cnnstudy: `make demo` and `make test` set everything up on a fresh clone, offline.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup browser postgresql debian-packages services services-stop test-services demo test test-fast ui bench bench-cluster bench-gpu lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision first, pinned: pip takes them from this machine's disk.
	$(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-compile -e '.[dev]' --config-settings editable_mode=compat  # src/ on sys.path: Hydra finds hydra_plugins
	# the bytecode pip would compile on one core, on all of them (-j 0); as with pip, a
	# file that is not Python 3 (a package's test data) is left uncompiled
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib src >/dev/null || true
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# Debian's chromium, for the test that opens a report in a headless browser
browser:
	@$(MAKE) -s debian-packages WANT=chromium

# Debian's PostgreSQL server, for storage=postgres (the study shared by many machines)
postgresql:
	@$(MAKE) -s debian-packages WANT=postgresql

# The Debian packages in WANT that are missing, with one apt-get update for all of them
WANT ?= chromium postgresql
debian-packages:
	@missing="$(if $(filter chromium,$(WANT)),$$(command -v chromium >/dev/null 2>&1 || echo chromium))\
	  $(if $(filter postgresql,$(WANT)),$$(command -v pg_ctlcluster >/dev/null 2>&1 || echo postgresql))"; \
	missing=$$(echo $$missing); [ -z "$$missing" ] || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing) \
	  >/dev/null 2>&1; } || echo "$$missing not installed: the tests that need it skip"

# PostgreSQL and an MLflow tracking server on 127.0.0.1 (README: Services); twice is harmless
services: setup postgresql
	$(BIN)/python -m cnnstudy services start

services-stop: setup
	$(BIN)/python -m cnnstudy services stop

# the services for the tests that need them: where they cannot start, those tests skip
# (CNNSTUDY_REQUIRE_SERVICES=1, set by .ci/run, makes them fail instead)
test-services: setup postgresql
	@$(BIN)/python -m cnnstudy services start || echo "services not started: their tests skip"

# the hidden-units question on the digits: a study of 12 configurations x 2 seeds, its report
demo: setup
	$(BIN)/cnnstudy-describe
	$(BIN)/cnnstudy-train -m sweep=hidden_units hydra.sweeper.seeds=2 hydra.sweeper.study_name=demo
	$(BIN)/cnnstudy-ui --print-only
	@echo "Start the dashboard with: make ui"

# the venv and the Debian packages are installed at once (pip and apt-get in parallel)
test:
	@$(MAKE) -s -j2 setup debian-packages
	@$(MAKE) -s test-services
	$(BIN)/pytest -q -n 2 --dist worksteal  # two workers: most tests wait on a subprocess

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

ui: setup
	$(BIN)/cnnstudy-ui

bench: setup
	$(BIN)/python benchmarks/throughput.py --epochs 10 --rounds 5
	$(BIN)/python benchmarks/mnist.py
	$(BIN)/python benchmarks/sweeper.py
	$(BIN)/python benchmarks/pictures.py
	$(BIN)/python benchmarks/questions.py
	$(BIN)/python benchmarks/calibration.py

# studies on PostgreSQL and the tracking server against SQLite (make services first)
bench-cluster: services
	$(BIN)/python benchmarks/cluster.py

# on a machine with a GPU: images/s, time to 99.0% on MNIST, a 100-trial study
bench-gpu: setup
	$(BIN)/python benchmarks/gpu.py

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache
