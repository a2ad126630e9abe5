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

# Each mode writes results/<mode>/<model>/results_<time>.json (results/hypothesis_layer<L>/ when MODEL_ARGS fixes
# layer=L): lm-eval names the folder below --output_path after pretrained= alone, so the mode goes in the path.
demo: install  ## the main job: the three modes on the embedded SmolLM2 model (LIMIT=n: n documents per task)
	layer=$$(printf '%s' '$(MODEL_ARGS)' | tr ',' '\n' | sed -n 's/^layer=//p' | grep -vx auto); \
	for mode in regular hypothesis baseline; do \
	  out=results/$$mode; if [ $$mode = hypothesis ] && [ -n "$$layer" ]; then out=$${out}_layer$$layer; fi; \
	  HF_HUB_OFFLINE=1 $(VENV)/bin/lm_eval --model hf-taskvec --model_args $(MODEL_ARGS),mode=$$mode \
	    --tasks $(TASKS) --batch_size 8 --output_path $$out $(if $(LIMIT),--limit $(LIMIT)); \
	done

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
