"""The learner and its rivals: the Double DQN, its trainer, checkpoints and the policy router, and
the fitted arms (static and rule baselines, the reward regressor) it is compared against.

May import: ``environments``, ``runtime``, ``machine``, ``pruners``, ``common``, ``model_loader``,
``nlp_analyzer``; never ``evaluation``, ``reporting``, ``serving`` or ``modes``.
"""
