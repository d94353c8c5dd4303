# The two set-up commands promised by the README: `make run` and `make test`.
PYTHON ?= python3
DATA ?= ../shared/datasets/fsdd

.PHONY: install run test lint bench

install:
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	@if [ -x scripts/install-system-deps.sh ]; then bash scripts/install-system-deps.sh; fi

# The main job: prepare the FSDD features, export the blog-style images, then train on the
# official split with the offline EfficientNet-Lite0 weights and print the test accuracy.
run: install
	soundsight prepare $(DATA) --split all --out cache
	soundsight export-images $(DATA) --split all --out runs/fsdd-images --cache cache
	soundsight train $(DATA) --out runs/fsdd --cache cache

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check src tests benchmarks && ruff format --check src tests benchmarks

bench:
	$(PYTHON) benchmarks/bench_prepare.py
	$(PYTHON) benchmarks/bench_train.py
