# `make train` and `make test` work on a fresh machine: the first call builds .venv.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py --config configs/tiny.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs
