"""Operations on one kind of unit in the weights: reorder and slice heads/KV groups, FFN channels and
layers into prefix views, prune the KV cache, and the mask hooks used for quality-only checks."""
