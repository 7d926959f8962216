"""Which units matter: importance criteria as objects (one score per target), the calibration pass that
feeds them, their on-disk cache, first-order Taylor scores, and the per-prompt probe of a request's prefill."""
