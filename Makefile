# mixtral-convert: everything a fresh clone needs, through two commands.
#   make demo   venv, install, build the tiny fixture, split / split-sparse / merge / verify it
#   make test   venv, install with dev extras, lint (ruff), run the test suite
#   make test-llama  build llama-cpp-python (once; the wheel is kept in .whl/) and run the GGUF
#               tests with llama.cpp as the judge, none skipped (CI runs it after make test)
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

# llama-cpp-python is a source distribution (cmake + a C++ compiler): built once into $(WHEELS) with
# only the library (no tools, server, examples, tests), then installed from there
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF
WHEELS ?= .whl
# the tests read Mixtral's tokenizer.model v1 and v3 from this wheel's data files (pyproject.toml: tokenizer-data)
MISTRAL_COMMON_SPEC ?= mistral_common==1.12.0

.PHONY: all venv install install-dev install-llama demo lint test test-llama bench bench-concat bench-ram clean

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
	$(PIP) install -q --no-deps "$(MISTRAL_COMMON_SPEC)"
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

$(VENV)/.installed-llama: $(VENV)/.installed-dev
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel -q --no-deps --find-links $(WHEELS) -w $(WHEELS) "$(LLAMA_CPP_SPEC)"
	$(PIP) install -q --find-links $(WHEELS) "$(LLAMA_CPP_SPEC)"
	@touch $@

install-llama: $(VENV)/.installed-llama

# the judge tests must run here: MIXTRAL_CONVERT_LLAMA=required turns their skip into a failure
test-llama: install-llama
	MIXTRAL_CONVERT_LLAMA=required $(PY) -m pytest -q -n $(JOBS) tests/gguf \
		tests/formats/test_rope_scaling.py::test_llama_cpp_computes_the_scaled_gguf_as_transformers_does

bench: install
	$(PY) bench/bench.py $(BENCH_ARGS)

bench-concat: install
	$(PY) bench/bench_concat.py $(BENCH_ARGS)

bench-ram: install
	$(PY) bench/bench_ram.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
