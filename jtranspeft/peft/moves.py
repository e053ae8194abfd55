"""The pure math of moving a LoRA adapter onto another base: training-free variants and layer moves.

Functions over `Lora` pytrees and base params, no files (the verdict and the outputs are
`jtranspeft.migration.transfer`'s):

- `project_lora`: LoRA-X-style projection of each delta onto the new weight's top-k singular subspaces;
- `rescale_lora`: keep each delta's size relative to its base weight, ||s A B|| / ||W||, per module and layer;
- `remap_layers`: move an adapter's layers onto a base of another depth, rewriting rank / alpha patterns
  so the result is still a standard PEFT adapter;
- `dora_column_scales` / `renorm_magnitudes`: DoRA's magnitudes on a new base, either kept as they are or
  re-normalised so each column keeps the scale m / ||W + s A B|| it had on the old base;
- `sample_like`: the portability study's "sampled" control, an adapter (any family) drawn at random with
  the same per-matrix mean and standard deviation as a given one.

Every function carries a DoRA adapter's magnitudes along with its factors.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from jtranspeft.models.params import base_kernel
from jtranspeft.models.spec import MODULE_BLOCK
from jtranspeft.peft.lora import Lora, dora_magnitudes, layer_ranks, layer_scales, lora_from_factors, with_magnitudes

_device_svd = jax.jit(functools.partial(jnp.linalg.svd, full_matrices=False))
SUBSPACE_CACHE_BYTES = 512 << 20  # singular vectors kept for reuse (`top_singular_vectors`)
_SUBSPACES: collections.OrderedDict = collections.OrderedDict()


def top_singular_vectors(w_io, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left [in, k] and right [out, k] singular vectors of one kernel [in, out] (float32, thin SVD).

    On CPU numpy's LAPACK (no compilation per shape); on an accelerator the device's SVD, much faster for
    large kernels. Only the top k vectors are returned (as host arrays). Recent results are kept (by the
    kernel's bytes, up to `SUBSPACE_CACHE_BYTES`): a fleet projected onto one new base decomposes each of its
    kernels once, not once per adapter.
    """
    w_io = np.asarray(w_io, np.float32)
    key = (w_io.shape, k, hashlib.blake2b(w_io.tobytes(), digest_size=16).digest())
    if key in _SUBSPACES:
        _SUBSPACES.move_to_end(key)
        return _SUBSPACES[key]
    if jax.default_backend() == "cpu":
        u_im, _, vt_mo = np.linalg.svd(w_io, full_matrices=False)
    else:
        u_im, _, vt_mo = _device_svd(jnp.asarray(w_io))
    found = np.ascontiguousarray(u_im[:, :k]), np.ascontiguousarray(np.asarray(vt_mo[:k]).T)
    _SUBSPACES[key] = found
    while sum(u.nbytes + v.nbytes for u, v in _SUBSPACES.values()) > SUBSPACE_CACHE_BYTES:
        _SUBSPACES.popitem(last=False)
    return found


def default_project_k(d_in: int, d_out: int) -> int:
    """Default subspace size of `project_lora`: half the smaller dimension of the weight."""
    return max(1, min(d_in, d_out) // 2)


def _project_layer(a_ir, b_ro, w_io, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Project one layer's factors onto W's top-k subspaces and re-balance them (float32, host)."""
    u_ik, v_ok = top_singular_vectors(w_io, k)
    a_ir = u_ik @ (u_ik.T @ np.asarray(a_ir, np.float32))
    b_ro = (np.asarray(b_ro, np.float32) @ v_ok) @ v_ok.T
    # SVD of the rank-r product through thin QRs: A = Qa Ra, B^T = Qb Rb, Ra Rb^T = X S Y^T.
    qa_ir, ra_rr = np.linalg.qr(a_ir)
    qb_or, rb_rr = np.linalg.qr(b_ro.T)
    x_rr, s_r, yt_rr = np.linalg.svd(ra_rr @ rb_rr.T)
    root_r = np.sqrt(s_r) * (np.arange(len(s_r)) < rank)  # padded ranks (jtranspeft.peft.lora) stay zero
    return (qa_ir @ x_rr) * root_r[None, :], root_r[:, None] * (yt_rr @ qb_or.T)


def project_lora(lora: Lora, new_params: dict, k: int | None = None) -> Lora:
    """The LoRA-X-style projection dW_n = U_k U_k^T dW V_k V_k^T onto the new base's top-k subspaces.

    U_k [in, k] / V_k [out, k] are the top-k left / right singular vectors of the new kernel W_n [in, out]
    (``k=None``: `default_project_k`; k is capped at min(in, out)). Because dW = s A B, the projection is
    s (U_k U_k^T A)(B V_k V_k^T): still of rank <= r, so the re-factorisation to rank r is exact. It is
    re-balanced with an SVD of the product, X S Y^T, as A = X sqrt(S) and B = sqrt(S) Y^T; the scale s and
    the config are unchanged, so the file stays a standard PEFT adapter.
    """
    factors = {}
    for module in lora.modules():
        a_lir, b_lro = lora.factors(module)
        w_lio = base_kernel(new_params, module)
        _, d_in, d_out = w_lio.shape
        kk = min(k or default_project_k(d_in, d_out), d_in, d_out)
        new_a, new_b = np.zeros(a_lir.shape, np.float32), np.zeros(b_lro.shape, np.float32)
        for layer, rank in enumerate(layer_ranks(lora.config, module, lora.num_layers)):
            if rank:
                new_a[layer], new_b[layer] = _project_layer(a_lir[layer], b_lro[layer], w_lio[layer], kk, rank)
        factors[module] = (jnp.asarray(new_a, a_lir.dtype), jnp.asarray(new_b, b_lro.dtype))
    return lora_from_factors(factors, lora.config, lora.magnitudes())


def rescale_lora(lora: Lora, old_norms: dict[str, np.ndarray], new_norms: dict[str, np.ndarray]) -> Lora:
    """Scale each delta so that ||s A B||_F / ||W||_F on the new base equals its value on the old base.

    Per module and layer, B is multiplied by ||W_n||_F / ||W_o||_F (``old_norms`` / ``new_norms``:
    module -> [L], indexed like the adapter's layers); alpha and the config stay as they are, so the
    file stays a standard PEFT adapter.
    """
    factors = {}
    for module in lora.modules():
        a_lir, b_lro = lora.factors(module)
        ratio_l = np.asarray(new_norms[module], np.float64) / np.asarray(old_norms[module], np.float64)
        factors[module] = (a_lir, (b_lro.astype(jnp.float32) * jnp.asarray(ratio_l, jnp.float32)[:, None, None]
                                   ).astype(b_lro.dtype))
    return lora_from_factors(factors, lora.config, lora.magnitudes())


def _module_config(values: dict[int, float], default, module: str, group: str) -> dict[str, float]:
    """Pattern entries that give ``values`` {layer: value}: one module-wide entry, or one per layer."""
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) == 1 and math.isclose(distinct[0], default):
        return {}
    if all(math.isclose(v, distinct[0]) for v in distinct):
        return {module: distinct[0]}
    return {f"model.layers.{j}.{group}.{module}": v for j, v in sorted(values.items())}


def remap_layers(lora: Lora, layer_map: dict[int, int], num_layers: int) -> Lora:
    """Move an adapter's layers: layer i of ``lora`` becomes layer ``layer_map[i]`` of a ``num_layers`` base.

    Layers not in the map are dropped; new layers no adapter layer maps to stay unadapted (rank 0). The
    config is rewritten so that every module keeps its rank and alpha per layer (module-wide pattern
    entries where they are uniform, one entry per layer where not).
    """
    src_layers = lora.num_layers
    kept = {i: j for i, j in layer_map.items() if i < src_layers}
    ranks, alphas, factors, magnitudes = {}, {}, {}, {}
    for module in lora.modules():
        r_l = layer_ranks(lora.config, module, src_layers)
        s_l = layer_scales(lora.config, module, src_layers)
        ranks[module] = {j: r_l[i] for i, j in kept.items() if r_l[i]}
        alphas[module] = {j: s_l[i] * (math.sqrt(r_l[i]) if lora.config.use_rslora else r_l[i])
                          for i, j in kept.items() if r_l[i]}
        a_lir, b_lro = lora.factors(module)
        src, dst = np.asarray(list(kept), int), np.asarray(list(kept.values()), int)
        new_a = jnp.zeros((num_layers,) + a_lir.shape[1:], a_lir.dtype).at[dst].set(a_lir[src])
        new_b = jnp.zeros((num_layers,) + b_lro.shape[1:], b_lro.dtype).at[dst].set(b_lro[src])
        factors[module] = (new_a, new_b)
        if lora.config.use_dora:
            m_lo = lora.magnitude(module)
            magnitudes[module] = jnp.zeros((num_layers, m_lo.shape[1]), m_lo.dtype).at[dst].set(m_lo[src])
    adapted = sorted({j for per_module in ranks.values() for j in per_module})
    if not adapted:
        raise ValueError(f"layer map {layer_map} keeps no adapted layer of the adapter")
    rank_pattern, alpha_pattern = {}, {}
    for module in lora.modules():
        rank_pattern |= _module_config(ranks[module], lora.config.r, module, MODULE_BLOCK[module])
        alpha_pattern |= _module_config(alphas[module], lora.config.alpha, module, MODULE_BLOCK[module])
    config = dataclasses.replace(
        lora.config, rank_pattern={k: int(v) for k, v in rank_pattern.items()}, alpha_pattern=alpha_pattern,
        layers=None if len(adapted) == num_layers else tuple(adapted))
    for module in lora.modules():  # the rewritten config must describe exactly the moved factors
        if layer_ranks(config, module, num_layers) != tuple(ranks[module].get(j, 0) for j in range(num_layers)):
            raise AssertionError(f"remapped ranks of {module} do not match")
    return lora_from_factors(factors, config, magnitudes or None)


def dora_column_scales(lora: Lora, params: dict) -> Lora:
    """A copy of a DoRA adapter whose magnitudes hold each column's scale m / ||W + s A B|| on the base of
    ``params`` (zero where a module is not adapted) instead of m; `renorm_magnitudes` turns them back."""
    norms = dora_magnitudes(params, lora)
    return with_magnitudes(lora, {m: lora.magnitude(m) / jnp.where(norms[m] > 0, norms[m], 1.0) for m in norms})


def renorm_magnitudes(scaled: Lora, params: dict) -> Lora:
    """Magnitudes from the column scales of `dora_column_scales` (moved, projected or rescaled since):
    m = scale * ||W + s A B|| on the base of ``params``, so the adapted columns keep their old scale."""
    norms = dora_magnitudes(params, scaled)
    return with_magnitudes(scaled, {m: scaled.magnitude(m) * norms[m] for m in norms})


def sample_like(adapter, key):
    """A random adapter of ``adapter``'s family, shapes and config whose every floating-point matrix (each
    leaf and layer: LoRA factors, DoRA magnitudes, sparse values, bottleneck weights) is drawn from a normal
    with that matrix's own mean and standard deviation over its nonzero entries (zeros kept: rank padding,
    unused slots); integer leaves (a sparse support) are kept, and so are DoRA magnitudes: they are the base's
    column norms plus a small trained change, and drawing them would rescale the base's columns at random
    rather than sample an adapter (measured: 0% on SmolLM2). The control of the PEFT-portability study
    (arXiv 2401.14228): a ported module should beat it."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(adapter)
    leaves = [x for _, x in with_paths]
    kept = [any(getattr(k, "key", None) == "magnitude" for k in path) for path, _ in with_paths]

    def draw(i, x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or kept[i]:
            return x
        values_x = np.asarray(x, np.float32)
        out = np.zeros_like(values_x)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(key, i))).ravel())
        for layer in range(values_x.shape[0]):
            live = values_x[layer] != 0
            if live.any():
                values = values_x[layer][live]
                out[layer][live] = rng.normal(values.mean(), values.std(), size=values.size)
        return jnp.asarray(out, x.dtype)

    return jax.tree_util.tree_unflatten(treedef, [draw(i, x) for i, x in enumerate(leaves)])
