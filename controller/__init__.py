"""The RL loop: observe -> act -> measure -> learn.

Owns: hardware telemetry and energy metering, contention (scenarios and the load generator), the
RL state, generation and timing, the environment (one prompt in, one measured outcome out) with
its quality scores and latency tables, the reward, the Double DQN, the trainer, the policy router,
checkpoints, per-run sessions and the record types they write.
May import: ``pruners``, ``common``, ``model_loader``, ``nlp_analyzer``; never ``evaluation``,
``reporting`` or ``modes``.
"""
