"""Run folders and what is written into them: metrics.json, its schema, summaries, plots, report.md.

Owns: run folders, the metrics.json schema check, every summary statistic, plots, markdown and
number formatting, provenance.
May import: ``controller`` (record types), ``common``; never ``evaluation`` or ``modes``.
"""
