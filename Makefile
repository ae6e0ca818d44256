# lmforge front door. `make test` and `make demo` set everything up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Without CUDA the CPU build of torch is installed first, so pip never pulls the multi-GB CUDA
# wheel. Point TORCH_INDEX at a CPU wheel index if your pip has no local CPU build.
TORCH_CPU   ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# Test files run on this many workers (whole files stay on one worker, so module fixtures such as
# the SLURM cluster start once); most tests are single-threaded subprocess runs.
TEST_WORKERS ?= 2
BENCH_ARGS  ?=

.PHONY: setup demo test lint format clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The pipeline on embedded data: pretrain the tiny preset on Python's own documentation, load it
# with plain transformers, then SFT -> reward model -> DPO -> GRPO -> PPO on generated chat
# tasks, and a table of what each stage measured.
demo: $(STAMP)
	$(BIN)/python pretrain/train.py --config configs/pretrain/demo.yaml
	$(BIN)/python examples/hf_generate.py runs/demo "The import statement"
	$(BIN)/python finetune/sft.py --config configs/finetune/sft.yaml
	$(BIN)/python finetune/reward.py --config configs/finetune/reward.yaml
	$(BIN)/python finetune/dpo.py --config configs/finetune/dpo.yaml
	$(BIN)/python finetune/grpo.py --config configs/finetune/grpo.yaml
	$(BIN)/python finetune/ppo.py --config configs/finetune/ppo.yaml
	$(BIN)/lmforge report runs/demo runs/sft runs/reward runs/dpo runs/grpo runs/ppo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

# Training and generation throughput of lmforge against transformers' Llama (same weights, same
# process): one table, and the figures in bench/results/<device>-<preset>.json. The tiny preset
# on CPU; BENCH_ARGS passes options (e.g. BENCH_ARGS="--model 1b --zero 3 --compile").
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
