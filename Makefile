# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-classify test test-all lint bench bench-docs bench-gpu bench-scale compare evidence docs clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/taildet demo

# Long-tailed classification: digits at imbalance 100, CE vs Balanced Softmax vs CE + LogN vs cRT over
# 3 seeds (a few minutes on 2 cores); the table is also written to docs/results/classify_digits.json
demo-classify: $(STAMP)
	$(VENV)/bin/taildet classify demo --out runs/demo_classify --summary docs/results/classify_digits.json \
		--figure docs/img/classify_digits_per_class.png
	$(VENV)/bin/taildet docs

# Lint first (ruff, the rules in pyproject.toml [tool.ruff.lint]), then the fast tests
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	@set -e; for f in benchmarks/*.py; do case $$f in *lvis_scale*|*errors_scale*) continue;; esac; echo "== $$f"; $(PY) $$f; done

# Re-measure the benchmark tables the docs show (docs/results/bench_*.json), then rewrite the docs.
# Run it on an idle machine: the tables record the machine, date and command they were measured with.
bench-docs: $(STAMP)
	cd benchmarks && ../$(PY) losses.py --json ../docs/results/bench_losses.json
	cd benchmarks && ../$(PY) losses.py --retain-memory --json ../docs/results/bench_losses_retain.json
	cd benchmarks && ../$(PY) mfs.py --json ../docs/results/bench_mfs.json
	cd benchmarks && ../$(PY) host_reads.py --json ../docs/results/bench_host_reads.json
	$(VENV)/bin/taildet docs

# Issue 18 on a GPU machine: the CUDA tests, then the training-step table (at most 8 minutes on one
# H100/H200) -> docs/results/bench_gpu_suite.json, then the docs.
bench-gpu: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_suite.sh
	$(VENV)/bin/taildet docs

# LVIS v1 at full size on this machine: memory and time of evaluation, load_lvis, data-loader workers
# and data stats (generates ~5 GB of JSON under /tmp once; about 15 minutes; an idle machine).
bench-scale: $(STAMP)
	cd benchmarks && ../$(PY) lvis_scale.py --segm --json ../docs/results/bench_lvis_scale.json
	cd benchmarks && ../$(PY) errors_scale.py --segm --json ../docs/results/bench_errors_scale.json
	$(VENV)/bin/taildet docs

compare: $(STAMP)
	$(VENV)/bin/taildet compare

# The claims table over 3 training seeds (hours on 2 CPU cores; resumable: finished runs are reused)
evidence: $(STAMP)
	$(VENV)/bin/taildet compare --claims --seeds 0 1 2 --reuse --out runs/evidence

# Rewrite the generated result tables of README.md / docs/RESULTS.md from docs/results/*.json
docs: $(STAMP)
	$(VENV)/bin/taildet docs

clean-venv:
	rm -rf $(VENV)
