"""Shared ground floor: Hub set-up, configuration dataclasses, prompt data sets, file I/O.

Owns: ``config`` (every config dataclass; imports no torch), ``hub`` (Hub reachability and
HF offline flags, project paths, .env), ``data`` (prompt sets), ``files`` (atomic writes).
May import: the standard library and light third-party packages only (never torch or the
project's other packages), so that ``adaptive_pruning.py --help`` stays instant.
"""
