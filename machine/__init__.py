"""What the controller senses of the machine, and the loads it is tested under.

Owns: hardware telemetry (psutil, NVML) with named slots, energy metering, load signals
(slowdown tracking), replayed telemetry traces, the background load generator and the
contention levels built from it.
May import: ``common``; never ``pruners``, ``runtime`` or anything above.
"""
