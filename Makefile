# The two set-up commands promised by the README: `make run` and `make test`.
# Everything installs into the Python that $(PYTHON) names (a virtual environment when one
# is active), at the exact versions of requirements/lock.txt.
PYTHON ?= python3
DATA ?= ../shared/datasets/fsdd
LOCK := requirements/lock.txt
# The lock is resolved within these caps (see the file); users' own installs are not capped.
LOCK_CONSTRAINTS := requirements/constraints.txt

.PHONY: install check-lock lock run test test-fast test-latest lint typecheck bench

install: check-lock
	$(PYTHON) -m pip install --quiet -c $(LOCK) -e '.[train,dev,birdnet]'
	$(PYTHON) -m soundsight.weights
	@if [ -x scripts/install-system-deps.sh ]; then bash scripts/install-system-deps.sh; fi

check-lock:
	@$(PYTHON) scripts/check_lock.py

# Re-resolve the lock against today's registry (runtime and dev extras), within the caps.
lock:
	uv pip compile pyproject.toml --all-extras --python-version 3.11 --upgrade \
	    -c $(LOCK_CONSTRAINTS) -o $(LOCK)

# The main job: prepare the FSDD features, export the blog-style images, then train on the
# official split with the offline EfficientNet-Lite0 weights and print the test accuracy.
run: install
	soundsight prepare $(DATA) --split all --out cache
	soundsight export-images $(DATA) --split all --out runs/fsdd-images --cache cache
	soundsight train $(DATA) --out runs/fsdd --cache cache

test: install
	$(PYTHON) -m pytest -q

# The inner loop: every test that trains no model (decoding, features, cache, layouts,
# tables, CLI parsing, images), in well under a minute. Installs nothing.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

# The newest versions pyproject.toml allows, no lock, in a throwaway virtual environment:
# shows drift before `make lock` moves the lock to it.
test-latest:
	@set -e; venv=$$(mktemp -d /tmp/soundsight-latest.XXXXXX); \
	trap 'rm -rf "$$venv"' EXIT; \
	$(PYTHON) -m venv "$$venv"; \
	"$$venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$venv/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[train,dev,birdnet]'; \
	"$$venv/bin/python" -m pip list --format=freeze > "$$venv/versions.txt"; \
	echo "test-latest: $$(wc -l < "$$venv/versions.txt") packages, e.g."; \
	grep -iE '^(torch|timm|lightning|numpy|pytest|schemathesis)==' "$$venv/versions.txt"; \
	PATH="$$venv/bin:$$PATH" "$$venv/bin/python" -m pytest -q

lint:
	ruff check src tests benchmarks scripts && ruff format --check src tests benchmarks scripts

typecheck:
	mypy

bench:
	$(PYTHON) benchmarks/bench_prepare.py
	$(PYTHON) benchmarks/bench_train.py
