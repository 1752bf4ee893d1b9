# Two commands do all set-up on a fresh machine that has Python 3.10+:
#   make demo   creates .venv, installs the requirements, builds rpe_ops, trains and evaluates the toy demo
#   make test   the same set-up, then the tests
#   make panoptic_demo   the toy detector, then its mask head on the frozen detector, ending with PQ
# PYTHON picks the interpreter that creates .venv; DEMO_OUT the demo's output folder.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= toy_out

# the demo's options: the same as README's "Quick start" command (tests/test_main.py checks it)
DEMO_ARGS = --dataset_file toy --output_dir $(DEMO_OUT) --enc_rpe2d rpe-2.0-product-ctx-1-k \
    --backbone resnet18 --backbone_weights none --lr 4e-4 --lr_backbone 1e-4 --dropout 0 \
    --hidden_dim 128 --nheads 4 --dim_feedforward 256 --enc_layers 2 --dec_layers 2 \
    --num_queries 8 --batch_size 8 --epochs 18 --lr_drop 14 --num_workers 1

# the panoptic demo (docs/segmentation.md): the same small model with 8 heads (the mask head's
# GroupNorm needs hidden + heads divisible by 8), on 1000 toy images with panoptic annotations;
# first the detector, then the mask head alone on the frozen detector (DETR's two stages). The
# random backbone stays as built (--lr_backbone 0: no backward pass through it, so the detector
# gets about twice the steps in the same time; the shapes' hues are what it needs to see)
PANOPTIC_OUT ?= toy_panoptic_out
PANOPTIC_ARGS = --dataset_file toy_panoptic --toy_path $(PANOPTIC_OUT)/toy_data \
    --enc_rpe2d rpe-2.0-product-ctx-1-k --backbone resnet18 --backbone_weights none \
    --lr_backbone 0 --dropout 0 --hidden_dim 128 --nheads 8 --dim_feedforward 256 --enc_layers 2 \
    --dec_layers 2 --num_queries 10 --batch_size 8 --num_workers 1 --toy_num_val 50
PANOPTIC_DETECTOR_ARGS = --lr 4e-4 --epochs 20 --lr_drop 16
PANOPTIC_MASK_ARGS = --masks --lr 1e-3 --epochs 6 --lr_drop 5

.PHONY: demo panoptic_demo test setup rpe_ops clean

demo: setup
	$(PY) main.py $(DEMO_ARGS)

# a new run starts afresh (log.txt is appended to); the toy data is kept
panoptic_demo: setup
	rm -rf $(PANOPTIC_OUT)/detector $(PANOPTIC_OUT)/masks
	$(PY) main.py $(PANOPTIC_ARGS) $(PANOPTIC_DETECTOR_ARGS) --output_dir $(PANOPTIC_OUT)/detector
	$(PY) main.py $(PANOPTIC_ARGS) $(PANOPTIC_MASK_ARGS) --output_dir $(PANOPTIC_OUT)/masks \
	    --frozen_weights $(PANOPTIC_OUT)/detector/checkpoint.pth

test: setup
	$(PY) -m pytest tests -q

setup: $(VENV)/.requirements rpe_ops

# the virtual environment and the requirements, redone when a requirements file changes
$(VENV)/.requirements: requirements.txt $(wildcard requirements-test.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt $(if $(wildcard requirements-test.txt),-r requirements-test.txt)
	touch $@

# the compiled extension, rebuilt when its sources change (see docs/rpe_ops.md)
RPE_OPS_SOURCES := rpe_ops/setup.py $(wildcard rpe_ops/csrc/*)
rpe_ops: rpe_ops/.built
rpe_ops/.built: $(VENV)/.requirements $(RPE_OPS_SOURCES)
	PYTHON=$(PY) bash rpe_ops/build.sh
	touch $@

clean:
	rm -rf rpe_ops/build rpe_ops/_C*.so rpe_ops/.built
