"""The gates an updated base must pass before Trans-PEFT compute is spent on it, and the choice of update.

An experiment can only show that Trans-PEFT repairs transfer if the update (a) keeps the model capable, (b)
really damages a transferred adapter, (c) damages it for real rather than by a format slip the exact-match
scorer punishes, and (d) damages it through the FFN, the part Trans-PEFT perturbs. Each gate is a number
checked against a threshold; `check_gates` returns every gate with its numbers and margin, and
`choose_update` picks the smallest interpolation lambda that passes them all (`jtranspeft.models.params`
``interpolate`` makes the candidates), or says which gate failed by how much.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class GateThresholds:
    """(a) Fine-tune_n >= Fine-tune_o - ``capability_slack``; (b) Direct Transfer <= Fine-tune_o -
    ``min_damage``; (c) Direct Transfer's mean generated tokens within ``max_length_ratio`` x of
    Fine-tune_o's (either way); (d) the FFN swap's share of the drop >= ``min_ffn_share``."""

    capability_slack: float = 0.02
    min_damage: float = 0.10
    max_length_ratio: float = 1.5
    min_ffn_share: float = 0.7


@dataclasses.dataclass(frozen=True)
class UpdateScores:
    """What the gates read for one candidate update (accuracies in [0, 1]).

    ``*_tokens``: mean generated tokens per item; ``*_first``: the first-number accuracy (reported beside
    exact match); ``ffn_share``: the attribution's FFN gap share (None when it was not measured).
    """

    fine_tune_o: float
    fine_tune_n: float | None
    direct: float
    fine_tune_o_tokens: float
    direct_tokens: float
    fine_tune_o_first: float | None = None
    direct_first: float | None = None
    ffn_share: float | None = None


def check_gates(s: UpdateScores, t: GateThresholds = GateThresholds()) -> dict:
    """{"a".."d": {"name", "passed", "value", "threshold", "margin", "detail"}}; a gate whose number is
    missing (None) fails with the reason in ``detail``. ``margin`` > 0 means passed by that much."""
    ratio = max(s.direct_tokens, s.fine_tune_o_tokens) / max(min(s.direct_tokens, s.fine_tune_o_tokens), 1e-9)

    def gate(name, value, threshold, margin, detail):
        if value is None:
            return {"name": name, "passed": False, "value": None, "threshold": threshold, "margin": None,
                    "detail": f"not measured ({detail})"}
        return {"name": name, "passed": margin >= 0, "value": value, "threshold": threshold,
                "margin": margin, "detail": detail}

    first = ("" if s.direct_first is None or s.fine_tune_o_first is None else
             f"; first-number: Fine-tune_o {s.fine_tune_o_first:.3f}, Direct Transfer {s.direct_first:.3f}")
    ftn = s.fine_tune_n
    return {
        "a": gate("capability kept", ftn, s.fine_tune_o - t.capability_slack,
                  None if ftn is None else ftn - (s.fine_tune_o - t.capability_slack),
                  f"Fine-tune_n {ftn if ftn is None else f'{ftn:.3f}'} vs Fine-tune_o {s.fine_tune_o:.3f} "
                  f"- {t.capability_slack}"),
        "b": gate("damage real", s.direct, s.fine_tune_o - t.min_damage, s.fine_tune_o - t.min_damage - s.direct,
                  f"Direct Transfer {s.direct:.3f} vs Fine-tune_o {s.fine_tune_o:.3f} - {t.min_damage}" + first),
        "c": gate("not a format artifact", ratio, t.max_length_ratio, t.max_length_ratio - ratio,
                  f"mean new tokens: Direct Transfer {s.direct_tokens:.2f}, Fine-tune_o {s.fine_tune_o_tokens:.2f}"
                  + first),
        "d": gate("FFN-concentrated", s.ffn_share, t.min_ffn_share,
                  None if s.ffn_share is None else s.ffn_share - t.min_ffn_share,
                  "FFN swap's share of the Direct Transfer drop"),
    }


def choose_update(candidates: Mapping[float, UpdateScores], t: GateThresholds = GateThresholds()) -> dict:
    """The smallest lambda whose gates all pass: {"chosen": lambda or None, "gates": {lambda: gates},
    "reason": text}. Without a passing lambda, the reason names, for each lambda, the failed gates and by
    how much they missed."""
    gates = {lam: check_gates(candidates[lam], t) for lam in sorted(candidates)}
    for lam, result in gates.items():
        if all(g["passed"] for g in result.values()):
            return {"chosen": lam, "gates": gates, "reason": f"lambda {lam} is the smallest that passes (a)-(d)"}
    misses = []
    for lam, result in gates.items():
        failed = [f"({k}) {g['name']}: " + (g["detail"] if g["margin"] is None else f"missed by {-g['margin']:.3f}")
                  for k, g in result.items() if not g["passed"]]
        misses.append(f"lambda {lam}: " + "; ".join(failed))
    return {"chosen": None, "gates": gates, "reason": "no lambda passes: " + " | ".join(misses)}


def format_gates(choice: dict) -> str:
    """Markdown table of every lambda's gates with numbers, then the choice."""
    lines = ["| lambda | gate | passed | value | threshold | margin | detail |", "|---|---|---|---|---|---|---|"]
    for lam, result in choice["gates"].items():
        for key, g in result.items():
            value = "-" if g["value"] is None else f"{g['value']:.3f}"
            margin = "-" if g["margin"] is None else f"{g['margin']:+.3f}"
            lines.append(f"| {lam} | ({key}) {g['name']} | {'yes' if g['passed'] else 'NO'} | {value} "
                         f"| {g['threshold']:.3f} | {margin} | {g['detail']} |")
    return "\n".join(lines + ["", choice["reason"], ""])
