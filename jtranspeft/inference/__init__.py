"""Inference: batched generation with a KV cache, one adapter or a bank of adapters per row (`generate`)."""
