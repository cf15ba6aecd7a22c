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

# Trains (or resumes) configs/tiny.yaml into runs/tiny, then samples from the trained model.
SAMPLE := -m deepseek_jax.generate --checkpoint runs/tiny --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 40
train: $(STAMP)
	$(VENV)/bin/python train.py --config configs/tiny.yaml --set train.ckpt_dir=runs/tiny --resume
	$(VENV)/bin/python $(SAMPLE)
	@echo "generate more: $(VENV)/bin/python $(SAMPLE)"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs
