# monai-mae: `make test` and `make demo` work on a fresh machine; both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lint test test-quick docs wheel-smoke demo demo-finetune bench gpu-check clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# A bare `torch` requirement pulls the newest CUDA build (gigabytes). When no torch is importable,
# install the pinned build first: on a CPU-only machine that is the CPU wheel.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# ruff's linter and formatter (configured in pyproject.toml); CI runs it before the tests.
LINTED := monai_mae tests benchmarks docs/conf.py
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# Everything (what CI runs), on TEST_WORKERS pytest-xdist workers that take the next test as they finish one
# (worksteal: the long bundle runs do not pile up on one worker). In-process tests get one OpenMP thread per worker;
# the bundle runs they start set their own 2 threads, and idle OpenMP threads sleep instead of spinning (PASSIVE),
# so two of them at once share 2 cores. test-quick skips the tests marked slow (bundle runs, torchrun, kill -9, CLIs).
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# test-quick runs QUICK_WORKERS pytest-xdist workers of one thread each (2 cores: about 80 s).
QUICK_WORKERS ?= 2
test-quick: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(QUICK_WORKERS) -m "not slow" tests

# The documentation site (Sphinx + MyST + furo) into docs/_build/html, warnings as errors; installs the docs
# extra first. The API pages are generated from the docstrings into docs/api/generated/.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

# Build the wheel, install it with its dependencies into a fresh venv, and use it from outside the
# repository (presets, one tiny epoch of the mae_pretrain bundle). Writes only under a temporary folder.
wheel-smoke:
	PYTHON=$(PYTHON) bash .ci/wheel_smoke.sh

# The demos (2 CPU cores: about 6 minutes together). `make demo` writes anatomical phantoms to DEMO_DATA if it
# holds no datalist, pretrains a UNet by masked-image modelling (75% of the 8^3 patches of each crop hidden; the
# pretraining study's best pretrained arm), reconstructs the validation volumes, and prints one line: the masked-patch
# error next to that of filling each masked patch with the mean. Pictures: $(DEMO_OUT)/reconstructions/latest.png.
DEMO_OUT  ?= outputs/mae_pretrain_demo
DEMO_DATA ?= data/synthetic
PRETRAIN_CONFIGS := 'bundles/mae_pretrain/configs/train.json','bundles/mae_pretrain/configs/mim_cnn.json'
demo: install
	@[ -f $(DEMO_DATA)/datalist.json ] || $(BIN)/python -m monai_mae synth $(DEMO_DATA) --layout anatomical
	$(BIN)/python -m monai.bundle run --config_file "[$(PRETRAIN_CONFIGS),'configs/demo_pretrain_cpu.json']" \
		--bundle_root bundles/mae_pretrain --meta_file bundles/mae_pretrain/configs/metadata.json \
		--logging_file bundles/mae_pretrain/configs/logging.conf --dataset_dir $(DEMO_DATA) --output_dir $(DEMO_OUT)
	$(BIN)/python -m monai.bundle run --config_file bundles/mae_pretrain/configs/inference.json \
		--bundle_root bundles/mae_pretrain --meta_file bundles/mae_pretrain/configs/metadata.json \
		--logging_file bundles/mae_pretrain/configs/logging.conf --dataset_dir $(DEMO_DATA) --output_dir $(DEMO_OUT)
	@$(BIN)/python -m monai_mae.demo pretrain $(DEMO_OUT)

# Fine-tune in one command from the demo's pretrained file (run `make demo` first): the network (the same UNet) and
# the data preset come from its model file; then evaluation (eval/metrics.json), segmentations in the input's space,
# and one line with the validation mean Dice. ARCH=... picks another network where the file allows it.
FT_OUT ?= outputs/finetune_demo
ARCH   ?=
FT_ARGS := --bundle_root bundles/mae_finetune --meta_file bundles/mae_finetune/configs/metadata.json \
	--logging_file bundles/mae_finetune/configs/logging.conf --dataset_dir $(DEMO_DATA) --output_dir $(FT_OUT)
demo-finetune: install
	$(BIN)/python -m monai.bundle run --config_file "['bundles/mae_finetune/configs/train.json','configs/demo_finetune_cpu.json']" \
		$(FT_ARGS) --pretrained_ckpt $(DEMO_OUT)/models/model.pt $(if $(ARCH),--architecture $(ARCH))
	$(BIN)/python -m monai.bundle run --config_file "['bundles/mae_finetune/configs/train.json','bundles/mae_finetune/configs/evaluate.json']" \
		$(FT_ARGS)
	$(BIN)/python -m monai.bundle run --config_file bundles/mae_finetune/configs/inference.json $(FT_ARGS)
	@$(BIN)/python -m monai_mae.demo finetune $(FT_OUT)

bench: install
	$(BIN)/python benchmarks/bench_vs_monai.py

# On a GPU machine (< 5 minutes): both bundles on cuda:0 with bf16 + compile, DDP on every visible GPU, and the
# model table (volumes/s, MFU, peak memory, host syncs per step); exits 2 without CUDA. See docs/gpu.md.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache docs/_build docs/api/generated
