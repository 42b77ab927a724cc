# Set up and check dsv4 on a fresh machine:  make run  |  make test
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# pip runs again only when pyproject.toml changes (the stamp lives inside the ignored venv)
STAMP := $(VENV)/.installed

.PHONY: venv browser test run

venv: $(STAMP)

# torch==2.13.0 is the local CPU wheel on these machines; never loosen the pin (a multi-GB CUDA build would come)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# the web page test drives Debian's chromium through playwright (playwright's own browser downloads are not used)
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: venv browser
	$(PY) -m pytest -q

# the one-command CPU run: tokenizer, pretraining and fine-tuning of `small` (~18 min on 2 cores, 3 of them compiling), then held-out
# bits-per-byte and sample completions; a finished run in runs/small is reused, a killed one continues
run: venv
	$(VENV)/bin/dsv4 info --preset small
	$(VENV)/bin/dsv4 train --preset small --out runs/small --resume
	$(VENV)/bin/dsv4 eval --ckpt runs/small/final --json runs/small/eval.json
