# Set up and check dsv4 on a fresh machine:  make run  |  make test
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# pip runs again only when pyproject.toml changes (the stamp lives inside the ignored venv)
STAMP := $(VENV)/.installed

.PHONY: venv test run

venv: $(STAMP)

# torch==2.13.0 is the local CPU wheel on these machines; never loosen the pin (a multi-GB CUDA build would come)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest -q

run: venv
	for p in tiny small v4-flash v4-pro v4-1t; do $(VENV)/bin/dsv4 info --preset $$p || exit 1; done
	$(PY) bench/forward.py --preset small --quick --ours-only
