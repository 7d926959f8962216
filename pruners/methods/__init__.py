"""Static pruning methods the controller is compared against (magnitude, Wanda-sp, Taylor, ShortGPT at a
parameter budget), unstructured references, and layer-wise reconstruction."""
