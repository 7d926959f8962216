"""The decode path: how a (pruned) model runs on this machine, separately from what is pruned.

Owns: the OpenMP wait policy and thread governor (live thread checks per machine state), the weight
dtype (int8/bf16 shadows read through the engine's prefix views), the decode kernel (``matvec.cpp``: one-row
products) and the lean step (``lean.py``, one kernel call per token in ``lean_step.cpp``), eager static-cache and
compiled decode steps, generation (prefill, KV-cache pruning, decode), the true floor of a step and the timing of runs.
May import: ``machine``, ``pruners``, ``common``, ``model_loader``; never ``environments``,
``controller`` or anything above.
"""
