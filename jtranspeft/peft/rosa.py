"""RoSA (robust adaptation, ICML 2024): a LoRA plus a sparse adapter S on the same kernels, trained together.

The adapted kernel is ``W + S + s A B``. S has a fixed support, chosen after a short LoRA-only warm-up by
the accumulated squared gradients of the kernels (``density`` of each kernel's entries, ~0.1-2%; the
support selection is `jtranspeft.peft.shira.choose_support` with the gradient mask), and holds only its
nonzeros: values [L, K] and flat positions [L, K], like a SHiRA adapter. A `Rosa` is the pair (`Lora`,
`Shira`); the decoder sees one ``"lora"`` collection holding both parts per module.

Files (jtranspeft's RoSA format): a directory with ``rosa.json`` ({"format": "jtranspeft-rosa", "version": 1,
"density": ...}), ``lora/`` (a standard HF PEFT LoRA adapter: peft and vLLM load it alone, without S) and
``sparse/`` (a peft SHiRA adapter of the same modules), read and written by `jtranspeft.load_peft` /
`jtranspeft.save_peft` (`jtranspeft.checkpoints.peft_format`); a merged HF checkpoint comes from
``jt.save_base(jt.merge_adapter(base, rosa), out)``.
"""

from __future__ import annotations

import dataclasses

import jax

from jtranspeft.peft.lora import Lora, merge_lora, unmerge_lora
from jtranspeft.peft.shira import Shira, merge_shira, unmerge_shira
from jtranspeft.utils.validate import check_range

ROSA_FILE = "rosa.json"


@dataclasses.dataclass(frozen=True)
class RosaConfig:
    """The sparse part of RoSA (the low-rank part is the run's ``lora`` section)."""

    density: float = 0.01  # fraction of each adapted kernel's entries in S
    warmup_steps: int = 20  # LoRA-only steps before the support is chosen
    score_batches: int = 8  # training batches whose squared kernel gradients rank the entries

    def __post_init__(self):
        check_range("rosa.density", self.density, above=0.0, maximum=1.0)
        check_range("rosa.warmup_steps", self.warmup_steps, minimum=0)
        check_range("rosa.score_batches", self.score_batches, minimum=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rosa:
    """A RoSA adapter: its low-rank part and its sparse part (both pytrees)."""

    lora: Lora
    sparse: Shira

    per_row = False

    def replace(self, **changes) -> "Rosa":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def params(self) -> dict:
        """Both parts' tensors in one tree, module by module: what the decoder's ``"lora"`` collection holds."""
        merged: dict = {"layers": {}}
        for part in (self.lora.params, self.sparse.params):
            for block, modules in part["layers"].items():
                for module, entry in modules.items():
                    merged["layers"].setdefault(block, {}).setdefault(module, {}).update(entry)
        return merged

    @property
    def dropout(self) -> float:
        """LoRA dropout of the low-rank part."""
        return self.lora.dropout

    @property
    def num_layers(self) -> int:
        """Depth of the base this adapter was made for."""
        return self.lora.num_layers

    def modules(self) -> list[str]:
        """Adapted module names (those of the low-rank part)."""
        return self.lora.modules()

    def scales(self):
        """The low-rank part's per-module, per-layer scales."""
        return self.lora.scales()


def make_rosa(lora: Lora, sparse: Shira) -> Rosa:
    """Pair a LoRA and a sparse adapter of the same modules (DoRA is not combined with a sparse part)."""
    if lora.config.use_dora:
        raise ValueError("RoSA pairs a plain LoRA with a sparse part; lora.use_dora must be false")
    if sorted(lora.modules()) != sorted(sparse.modules()):
        raise ValueError(f"RoSA parts adapt different modules: lora {lora.modules()}, sparse {sparse.modules()}")
    return Rosa(lora=lora, sparse=sparse)


def merge_rosa(base, rosa: Rosa):
    """``base`` with W + S + s A B folded in."""
    return merge_shira(merge_lora(base, rosa.lora), rosa.sparse)


def unmerge_rosa(base, rosa: Rosa):
    """Inverse of `merge_rosa` (exact up to the base dtype's rounding)."""
    return unmerge_lora(unmerge_shira(base, rosa.sparse), rosa.lora)
