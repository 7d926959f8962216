"""The offline study's per-prompt questions, each summarised from metrics.json alone and rendered as a report
section: does the policy buy quality at the static actions' speed (``equal_speed``), and how much per-prompt
damage varies on the study's own prompts and how much of it the state's prompt features predict (``headroom``);
and which of an offline test's pricings scores which arm (``pricing``: with a look-ahead state, two).

May import: ``reporting`` (the clustered bootstrap, the headroom statistics), ``controller``, ``common``.
"""
