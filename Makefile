# lmforge front door. `make test` and `make demo` set everything up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every install is constrained to the exact versions the test suite passed with (`make lock`
# refreshes the file from .venv). Constraints pin versions without adding packages, so CUDA's
# extra packages still come on a GPU machine, and pins carry no local label (torch==2.13.0 is
# met by 2.13.0+cpu and by the CUDA wheel alike).
CONSTRAINTS := constraints.txt
# Without CUDA the CPU build of torch is installed first, so pip never pulls the multi-GB CUDA
# wheel; its version comes from the constraints. Point TORCH_INDEX at a CPU wheel index if your
# pip has no local CPU build: torch alone comes from there (such an index need not hold the
# pinned versions of torch's dependencies; they come with lmforge's, from the usual index).
TORCH_CPU   ?= torch
TORCH_INDEX ?=
PYTEST_ARGS ?=
# Test files run on this many workers (whole files stay on one worker, so module fixtures such as
# the SLURM cluster start once); most tests are single-threaded subprocess runs.
TEST_WORKERS ?= 2
BENCH_ARGS  ?=

.PHONY: setup demo test lint format clean bench bench-peer gpu-check gpu-wheels lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q -c $(CONSTRAINTS) \
	    $(if $(TORCH_INDEX),--no-deps --index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev,eval]'
	touch $(STAMP)

# Rewrite the constraints from what .venv holds: upgrade there first (for instance
# `.venv/bin/pip install -U transformers`), run `make test`, then `make lock` and commit the file.
lock:
	$(BIN)/python .ci/lock.py > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	test ! -e $(STAMP) || touch $(STAMP)  # .venv already holds these versions

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

# Every finetuning stage against TRL (SFT, reward, DPO, GRPO): same weights, data, order,
# optimizer and threads, alternating runs, both scored by lmforge's evaluation; starts from the
# demo's checkpoints (make demo). BENCH_ARGS passes options (e.g. BENCH_ARGS="--pairs 1").
bench-peer: $(STAMP)
	$(BIN)/python bench/peer.py $(BENCH_ARGS)

# Everything that proves lmforge on one CUDA device, as one bounded command (bench/gpu_check.py):
# the CUDA tests, every stage in bf16, the benchmarks against transformers, the 7b preset.
# Results and logs go to $$GPU_OUT (or $$OUT, or bench/results/gpu-check). On a machine without
# this .venv (a GPU image with torch) it uses python3, with the wheels of .whl/ installed into
# GPU_SITE first (bench/gpu_check.sh, which runs without make too). GPU_CHECK_ARGS passes
# options, e.g. GPU_CHECK_ARGS=--cpu-dry-run on a CPU.
GPU_PYTHON ?=
GPU_SITE ?= /tmp/lmforge-site
GPU_CHECK_ARGS ?=
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) GPU_SITE=$(GPU_SITE) bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# The wheels a GPU machine without network needs beyond an image with torch and transformers
# (DeepSpeed, datasets and what they pull), pinned by the constraints, into .whl/ for the Python
# of that machine (GPU_WHEEL_PY); carry .whl/ there and `make gpu-check` installs them. DeepSpeed
# ships a source archive only: it becomes a pure-Python wheel (its CUDA ops build on first use).
GPU_WHEEL_PY ?= 3.12
GPU_WHEELS ?= deepspeed hjson pydantic pydantic-core annotated-types typing-inspection ninja \
  py-cpuinfo msgpack einops datasets dill multiprocess pandas python-dateutil pytz tzdata six
GPU_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_17 manylinux2014,--platform $(p)_x86_64)
gpu-wheels: $(STAMP)
	mkdir -p .whl
	for p in $(GPU_WHEELS); do \
	  $(BIN)/pip download -q --no-deps -c $(CONSTRAINTS) -d .whl --only-binary=:all: \
	    --python-version $(GPU_WHEEL_PY) --implementation cp $(GPU_PLATFORMS) "$$p" \
	  || $(BIN)/pip download -q --no-deps -c $(CONSTRAINTS) -d .whl --no-binary=:all: "$$p" \
	  || exit 1; \
	done
	for s in .whl/*.tar.gz; do \
	  [ -e "$$s" ] || continue; \
	  $(BIN)/pip wheel -q --no-deps -w .whl "$$s" && rm "$$s" || exit 1; \
	done
	ls .whl

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
