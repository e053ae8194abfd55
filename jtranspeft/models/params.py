"""Our params tree: where a projection's kernel lives, the module group of every parameter, surgery by group.

Base params are nested dicts stacked over layers: ``params["layers"][block][module]["kernel"]`` is the
[L, in, out] kernel of a projection (`base_kernel`; ``block`` from `jtranspeft.models.spec.PROJECTIONS`).
Continued pre-training (`jtranspeft.training.evolve`) gives each module group its own learning-rate
multiplier, and the component-swap attribution (`jtranspeft.analysis.attribution`) moves whole groups from
one base to another, so both read the group of a parameter from `param_group`:

- ``attention``: q, k, v, o kernels and biases, and the per-head q/k norms (qwen3);
- ``ffn``: gate, up and down kernels;
- ``embeddings``: ``embed_tokens`` and an untied ``lm_head`` (a tied head is the embedding itself);
- ``norms``: the per-layer RMSNorms (two, or four with gemma3's sandwich norms) and the final norm.

Paths are those of our params tree (``("layers", "self_attn", "q_proj", "kernel")``); a path this table
does not know is an error, so a new kind of tensor can never fall into no group silently.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax

from jtranspeft.models.spec import GROUPS, MODULE_BLOCK, PROJECTIONS, ModelSpec

_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")  # every name `ModelSpec.layer_norms` can give
_BLOCK_GROUP = {p.block: p.group for p in PROJECTIONS}


def param_shapes(spec: ModelSpec) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every base parameter of ``spec`` (per-layer tensors stacked on a leading [L] axis).

    Written out from the spec so that loading needs no model tracing; `tests/test_models.py` checks it equals
    the decoder's own abstract initialisation for every family.
    """
    d, n = spec.hidden_size, spec.num_layers
    shapes = {("embed_tokens", "embedding"): (spec.vocab_size, d), ("norm", "scale"): (d,),
              **{("layers", name, "scale"): (n, d) for name in spec.layer_norms}}
    if not spec.tie_word_embeddings:
        shapes[("lm_head",)] = (d, spec.vocab_size)
    for p in PROJECTIONS:
        d_in, d_out = spec.projection_shape(p.name)
        shapes[("layers", p.block, p.name, "kernel")] = (n, d_in, d_out)
        if (spec.qkv_bias and p.name in ("q_proj", "k_proj", "v_proj")) or (spec.o_bias and p.name == "o_proj"):
            shapes[("layers", p.block, p.name, "bias")] = (n, d_out)
    if spec.qk_norm:
        for name in ("q_norm", "k_norm"):
            shapes[("layers", "self_attn", name, "scale")] = (n, spec.head_dim)
    return shapes


def base_kernel(params: dict, module: str):
    """The stacked kernel [L, in, out] of a projection in a base params tree."""
    return params["layers"][MODULE_BLOCK[module]][module]["kernel"]


def param_group(path: tuple[str, ...]) -> str:
    """The group of one parameter, from its path in a base params tree."""
    top = path[0]
    if top in ("embed_tokens", "lm_head"):
        return "embeddings"
    if top == "norm":
        return "norms"
    if top == "layers" and len(path) >= 3:
        if path[1] in _LAYER_NORMS:
            return "norms"
        if path[1] in _BLOCK_GROUP:
            return _BLOCK_GROUP[path[1]]
    raise KeyError(f"parameter {'.'.join(path)} belongs to no module group ({', '.join(GROUPS)})")


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def group_labels(params: dict) -> dict:
    """A tree shaped like ``params`` holding the group name of every leaf."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(_names(path)), params)


def split_by_group(params: dict, groups: Iterable[str]) -> tuple[dict, dict]:
    """(the leaves in ``groups``, the others) as two nested dicts; `merge_trees` puts them back together."""
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}; known: {', '.join(GROUPS)}")

    def split(tree: dict, prefix: tuple[str, ...]) -> tuple[dict, dict]:
        inside, outside = {}, {}
        for key, value in tree.items():
            path = prefix + (key,)
            if isinstance(value, dict):
                a, b = split(value, path)
                if a:
                    inside[key] = a
                if b:
                    outside[key] = b
            elif param_group(path) in groups:
                inside[key] = value
            else:
                outside[key] = value
        return inside, outside

    return split(params, ())


def merge_trees(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of `split_by_group`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out:
            if not (isinstance(out[key], dict) and isinstance(value, dict)):
                raise ValueError(f"both trees hold a leaf at {key!r}")
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def swap_groups(params: dict, donor: dict, groups: Iterable[str]) -> dict:
    """``params`` with the tensors of ``groups`` taken from ``donor`` (same structure and shapes)."""
    taken, _ = split_by_group(donor, groups)
    _, kept = split_by_group(params, groups)
    merged = merge_trees(taken, kept)
    if jax.tree_util.tree_structure(merged) != jax.tree_util.tree_structure(params):
        raise ValueError("the donor's params tree has a different structure (another architecture?)")
    return merged


def interpolate_params(old: dict, new: dict, lam: float) -> dict:
    """``W_lam = W_old + lam (W_new - W_old)`` for every tensor (lam > 1 extrapolates the update).

    Computed as ``(1 - lam) W_old + lam W_new`` in float32, so lam 0 gives ``old`` and lam 1 gives ``new``
    bit for bit; tensors the update left unchanged (frozen groups) stay bit-identical for every lam.
    """
    import jax.numpy as jnp

    if jax.tree_util.tree_structure(old) != jax.tree_util.tree_structure(new):
        raise ValueError("the two params trees differ in structure (another architecture?)")

    def mix(path, a, b):
        if a.shape != b.shape:
            raise ValueError(f"tensor {'.'.join(_names(path))}: shapes {a.shape} and {b.shape} differ")
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        return jnp.where(a32 == b32, a32, (1.0 - lam) * a32 + lam * b32).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(mix, old, new)
