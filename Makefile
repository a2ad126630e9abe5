# Set-up and everyday commands. `make demo` and `make test` each install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_ARGS ?= pretrained=embedded
TASKS ?= tv_letter_to_upper
LIMIT ?=

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: install  ## the main job: the three modes on the embedded SmolLM2 model (LIMIT=n: n documents per task)
	for mode in regular hypothesis baseline; do \
	  HF_HUB_OFFLINE=1 $(VENV)/bin/lm_eval --model hf-taskvec --model_args $(MODEL_ARGS),mode=$$mode \
	    --tasks $(TASKS) --batch_size 8 --output_path results $(if $(LIMIT),--limit $(LIMIT)); \
	done

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
