"""Getting quality back after a cut: training-free compensation (FLAP-style biases, linear replacement of
dropped layers), nested healing of the whole menu, and a healed model's sidecar (elastic)."""
