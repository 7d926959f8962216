"""One function per CLI mode (train, test, eval, report, baselines, export, heal), callable without argv.

Owns: turning a config into a run (load, run, write the report folder).
May import: every other package; nothing imports ``modes`` but the CLI.
"""
