"""Training data: sources (local files, hub ids, reasoning-gym), prompt templates, tokenised length-bucketed
batches, and packed corpora for continued pre-training."""
