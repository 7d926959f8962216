"""What one (prompt, action) costs in quality, measured once: the dense reference and the PPL ratio / KL
against it (quality), the on-disk outcome cache, its precompute fanned out locally or on Ray, and the
per-prompt headroom report that says how much any per-prompt policy could gain."""
