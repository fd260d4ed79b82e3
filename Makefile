# Set-up is part of every target: the first run creates .venv and installs the
# package with its pinned torch; later runs reuse it until pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The optional mpnet-base text tower (its packages need pip --no-deps), for the tests.
TOWERS := $(VENV)/.towers
export HF_HUB_OFFLINE ?= 1
# The digit datasets sit in ../shared/data beside a checkout unless told otherwise.
export MMTRANSFER_DATA_DIR ?= $(abspath ../shared/data)
PYTEST_ARGS ?=

.PHONY: demo test test-fast install towers clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

$(TOWERS): $(STAMP)
	$(PY) -m mmtransfer.towers install mpnet-base
	@touch $@

install: $(STAMP)

# The optional towers: the ViT comes with the dev extra, mpnet-base needs its own install.
towers: $(TOWERS)

# The main job: fine-tune the offline default on OpenMoji captions, print retrieval
# metrics and where the model went.
demo: $(STAMP)
	$(PY) scripts/finetune_captions.py --config configs/openmoji_contrastive.yaml $(ARGS)

test: $(STAMP) $(TOWERS)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
