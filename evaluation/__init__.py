"""Scoring models: WikiText-2 perplexity, lm-eval tasks on local data, routes, speed, baselines.

Owns: routes (dense, static action, policy-routed), the WikiText-2 protocol, lm-eval task
preparation and running, the speed/resource probe, the evaluation suite and the static
baselines sweep.
May import: ``controller``, ``pruners``, ``common``, ``model_loader``; never ``reporting`` or ``modes``.
"""
