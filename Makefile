# The two commands of the README:
#   make demo   create .venv, install exactflow, train a flow on a built-in dataset, write its report
#   make test   create .venv with the dev extras and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-fast install install-dev bench bench-quick lint clean figures

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[all]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/exactflow demo --out runs/demo

test: install-dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q

# The suite without the long training tests (marked slow), for quick iterations.
test-fast: install-dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q -m "not slow"

figures: install
	$(BIN)/exactflow demo --out runs/demo
	cp runs/demo/report/data_vs_model.png runs/demo/report/cartographer.png docs/figures/

$(VENV)/.installed-bench: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[bench]"
	touch $@

# Head-to-head benchmark against zuko, nflows and normflows (benchmarks/README.md).
# Everything measured against the peers and the classical estimators (about an hour on
# 2 cores): speed and test NLL (run.py), where the time goes (roofline.py), the real tables
# (realdata.py), the anomaly flags' false-alarm rate (anomaly.py). Results in
# benchmarks/results/; benchmarks/README.md says what each one shows.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.roofline --out benchmarks/results
	$(BIN)/python -m benchmarks.optimizer
	$(BIN)/python -m benchmarks.realdata --methods gaussian,gmm,kde,zuko-nsf,flowdensity \
		--json benchmarks/results/realdata-default.json --md benchmarks/results/realdata-default.md
	$(BIN)/python -m benchmarks.anomaly --seeds 10 --json benchmarks/results/anomaly.json
	$(BIN)/python -m benchmarks.gmm_folds
	$(BIN)/python -m benchmarks.gmm_search
	$(BIN)/python -m benchmarks.tiny

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run --quick

lint: install-dev
	$(BIN)/ruff check exactflow tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
