"""The architecture: `spec` (facts from config.json plus THE table of projections, groups and widths), `params`
(paths and groups in the params tree), `layers`, `perturb` (training-time FFN perturbations), `decoder` (one
scanned Flax decoder for llama / qwen2 / qwen3 / mistral) and `base` (`Base` and `apply`)."""
