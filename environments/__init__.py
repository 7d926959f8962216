"""Where the controller acts: one prompt in, one measured outcome (and reward) out.

Owns: the live environment (prune, generate, time, score), the precomputed environment (outcomes
and latency tables looked up), the observation (state vector, prefill-probe features) and reward, the
measured outcomes (``outcomes``: quality, cache, headroom), latency tables and their calibration under load, the serving queue (``queueing``), per-run sessions (model +
engine + environment wiring) and the record types they write.
May import: ``runtime``, ``machine``, ``pruners``, ``common``, ``model_loader``, ``nlp_analyzer``;
never ``controller`` or anything above.
"""
