# mixtral-convert: everything a fresh clone needs, through two commands.
#   make demo   venv, install, build the tiny fixture, split / split-sparse / merge / verify it
#   make test   venv, install with dev extras, lint (ruff), run the test suite
#   make bench  the disk-speed and memory benchmark (not part of make test)
#   make bench-concat  concat against cat on a several-GB checkpoint (not part of make test)
#   make bench-ram  the tool's own ceiling, source and output on a tmpfs (not part of make test)
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2
DEMO_DIR ?= demo

.PHONY: all venv install install-dev demo lint test bench bench-concat bench-ram clean

all: test

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@touch $@

# torch first, pinned, so that pip never resolves torch itself (a loose range would pull a CUDA build)
$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.created
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) fixtures/demo.py $(DEMO_DIR)

lint: install-dev
	$(VENV)/bin/ruff check .

test: install-dev lint
	$(PY) -m pytest -q -n $(JOBS) tests

bench: install
	$(PY) bench/bench.py $(BENCH_ARGS)

bench-concat: install
	$(PY) bench/bench_concat.py $(BENCH_ARGS)

bench-ram: install
	$(PY) bench/bench_ram.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
