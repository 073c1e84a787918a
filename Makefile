# cnnstudy: `make demo` and `make test` set everything up on a fresh clone, offline.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup browser demo test test-fast ui bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision first, pinned: pip takes them from this machine's disk.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat  # src/ on sys.path: Hydra finds hydra_plugins
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# Debian's chromium, for the test that opens a report in a headless browser
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  >/dev/null 2>&1; } || echo "chromium not installed: the browser test will skip"

# the hidden-units question on the digits: a study of 12 configurations x 2 seeds, its report
demo: setup
	$(BIN)/cnnstudy-describe
	$(BIN)/cnnstudy-train -m sweep=hidden_units hydra.sweeper.seeds=2 hydra.sweeper.study_name=demo
	$(BIN)/cnnstudy-ui --print-only
	@echo "Start the dashboard with: make ui"

test: setup browser
	$(BIN)/pytest -q -n 2  # two workers: most tests wait on a cnnstudy-train subprocess

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

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache
