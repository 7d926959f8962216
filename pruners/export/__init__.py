"""Pruned models out of the tool: a Hugging Face folder (stock config for uniform plans, a per-layer
model with its modeling code otherwise) and a GGUF with per-layer arrays for llama.cpp."""
