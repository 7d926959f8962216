"""Serving: the OpenAI-compatible server whose controller prunes under real request load.

Owns: the ASGI app and its wire format (protocol, text), the continuous-batching scheduler and its running
batch, the server's Prometheus metrics, the measurement of the step-time table, building a server from the
run's configs, the load generator's client side (arrival processes, the async client, per-request records), and
the soak (a server process under load, its memory sampled, every request accounted for).
May import: ``controller``, ``environments``, ``runtime``, ``machine``, ``pruners``, ``common``,
``model_loader``, ``nlp_analyzer``; never ``evaluation``, ``reporting`` or ``modes``.
"""
