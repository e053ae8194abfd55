"""The PEFT families, in one table: what each adapter is and how the shared paths treat it.

Every family's adapter is a frozen dataclass pytree whose ``params`` go into the decoder's ``"lora"``
collection, read per projection by `jtranspeft.models.layers.Projection`; the trainer differentiates only the
floating-point leaves (a SHiRA support is integer and stays fixed), so one training loop, one merge path and
one generation path serve them all. Each family's files are read and written by its format module,
``jtranspeft.checkpoints.peft_format.FORMATS[family.name]`` (checkpoints imports peft, not the reverse).

==========  =====================================  ================================  ===============  ===========
family      params per adapted module              forward                           file             transfer
==========  =====================================  ================================  ===============  ===========
lora        lora_A [L,in,r], lora_B [L,r,out]      y + s x A B                       peft LORA        reuse, project, rescale
dora        lora + magnitude [L,out]               m (W + s A B) / ||W + s A B||     peft LORA +      as lora; magnitude keep
                                                                                     use_dora         or renorm
shira       shira_values [L,K], shira_index [L,K]  (W + scatter(values)) x           peft SHIRA       reuse
rosa        lora's + shira's                       (W + S) x + s x A B               rosa.json +      reuse
                                                                                     lora/ + sparse/
bottleneck  adapter_attn/ffn: down [L,d,b],        f + s relu(f D) U after the       jtranspeft       reuse
            up [L,b,d] (per layer, not module)     attention and the FFN output      BOTTLENECK       (no merge)
==========  =====================================  ================================  ===============  ===========

DoRA is LoRA with ``use_dora`` (peft's own design): it shares `Lora` and its functions. A RoSA adapter's
sparse support is chosen by gradients after a LoRA warm-up, so the trainer builds it
(`jtranspeft.training.finetune.init_adapter`); its ``init`` here takes those scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jtranspeft.peft.bottleneck import Bottleneck, BottleneckConfig, init_bottleneck, merge_bottleneck
from jtranspeft.peft.lora import Lora, LoraConfig, init_lora, merge_lora, unmerge_lora
from jtranspeft.peft.rosa import Rosa, RosaConfig, make_rosa, merge_rosa, unmerge_rosa
from jtranspeft.peft.shira import Shira, ShiraConfig, init_shira, merge_shira, unmerge_shira

FAMILY_NAMES = ("lora", "shira", "rosa", "bottleneck")  # values of the run config's ``peft`` key (DoRA: lora with use_dora)


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between PEFT families; everything else is shared."""

    name: str
    adapter_type: type
    config_type: type
    init: Callable[..., Any]  # (base, config, key, scores=None) -> adapter
    merge: Callable[[Any, Any], Any]  # (base, adapter) -> base with the adapter folded in
    unmerge: Callable[[Any, Any], Any]
    transfer_methods: tuple[str, ...]  # `jtranspeft.migration.transfer` methods that apply
    mergeable: bool = True  # False: served unmerged (a bottleneck adapter is not a weight delta)


FAMILIES = {
    "lora": Family("lora", Lora, LoraConfig, lambda base, cfg, key, scores=None: init_lora(base, cfg, key),
                   merge_lora, unmerge_lora, ("reuse", "project", "rescale")),
    "shira": Family("shira", Shira, ShiraConfig, lambda base, cfg, key, scores=None: init_shira(base, cfg, scores),
                    merge_shira, unmerge_shira, ("reuse",)),
    "rosa": Family("rosa", Rosa, RosaConfig, lambda base, cfg, key, scores=None: init_rosa(base, *cfg, key, scores),
                   merge_rosa, unmerge_rosa, ("reuse",)),
    "bottleneck": Family("bottleneck", Bottleneck, BottleneckConfig,
                         lambda base, cfg, key, scores=None: init_bottleneck(base, cfg, key),
                         merge_bottleneck, merge_bottleneck, ("reuse",), mergeable=False),  # both refuse
}


def init_rosa(base, lora, config: RosaConfig, key, scores) -> Rosa:
    """RoSA from a (warmed-up) `Lora` and squared kernel gradients {module: [L, in, out]}: the sparse part's
    support is the ``density`` largest-gradient entries of each kernel, its values zero."""
    del key
    sparse = init_shira(base, ShiraConfig(density=config.density, targets=lora.config.targets,
                                          mask_type="gradient"), scores)
    return make_rosa(lora, sparse)


def family_of(adapter) -> Family:
    """The `Family` of an adapter object."""
    for family in FAMILIES.values():
        if isinstance(adapter, family.adapter_type):
            return family
    raise TypeError(f"not an adapter of a known PEFT family: {type(adapter).__name__}")


def merge_adapter(base, adapter):
    """``base`` with ``adapter`` (any family) folded into its weights."""
    return family_of(adapter).merge(base, adapter)


def unmerge_adapter(base, adapter):
    """Inverse of `merge_adapter` (a ValueError for DoRA, whose merge cannot be undone)."""
    return family_of(adapter).unmerge(base, adapter)


ADAPTER_TYPES = tuple(family.adapter_type for family in FAMILIES.values())  # what `jt.apply` / `jt.generate` take
