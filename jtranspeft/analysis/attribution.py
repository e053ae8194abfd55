"""Component-swap attribution: which module group of a base update costs an adapter its task score.

Direct Transfer puts an adapter trained on the OLD base onto the NEW one. To see which part of the update
causes the loss, the old base gets the new base's tensors of one module group at a time
(`jtranspeft.models.params.swap_groups`), and the same adapter is scored on each hybrid:

    all old | old + new FFN | old + new attention | old + new embeddings & norms | all new

``gap_share`` of a row is (score(row) - score(all old)) / (score(all new) - score(all old)), for the loss
and the accuracy: about 1 means that group alone reproduces the whole Direct Transfer change, about 0
that it contributes nothing. Shares need not add up to 1 (groups interact). Trans-PEFT's FFN
perturbations target the first kind of update: a large FFN share says the method has something to fix.
The score is any `jtranspeft.analysis.scoring.Scorer`.
"""

from __future__ import annotations

import math


from jtranspeft.analysis.scoring import Scorer
from jtranspeft.models.base import Base
from jtranspeft.models.params import GROUPS, swap_groups
from jtranspeft.peft.lora import Lora
from jtranspeft.utils.progress import progress_bar

SWAPS = (("all old", ()), ("new ffn", ("ffn",)), ("new attention", ("attention",)),
         ("new embeddings+norms", ("embeddings", "norms")), ("all new", GROUPS))


def _share(value: float, old: float, new: float) -> float | None:
    gap = new - old
    if gap == 0 or not all(math.isfinite(x) for x in (value, old, new)):
        return None
    return (value - old) / gap + 0.0  # + 0.0: no "-0.00" for the all-old row


def swap_attribution(old: Base, new: Base, scorer: Scorer, lora: Lora | None = None, progress: bool = True) -> dict:
    """Score the old base with each group of the new base swapped in (see the module docstring).

    Returns {"rows": [{"name", "groups", "accuracy", "loss", "gap_share": {"accuracy", "loss"}}, ...]}.
    """
    rows = []
    for name, groups in progress_bar(SWAPS, desc="swaps", unit="swap", enabled=progress):
        hybrid = old.replace(params=swap_groups(old.params, new.params, groups)) if groups else old
        rows.append({"name": name, "groups": list(groups), **scorer(hybrid, lora)})
    first, last = rows[0], rows[-1]
    for row in rows:
        row["gap_share"] = {metric: _share(row[metric], first[metric], last[metric]) for metric in ("accuracy", "loss")}
    return {"rows": rows}
