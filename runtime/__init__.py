"""The decode path: how a (pruned) model runs on this machine, separately from what is pruned.

Owns: the OpenMP wait policy and thread governor, eager and compiled decode steps, generation
(prefill, KV-cache pruning, decode) and the timing of runs.
May import: ``machine``, ``pruners``, ``common``, ``model_loader``; never ``environments``,
``controller`` or anything above.
"""
