"""``python -m jtranspeft.analyze --old PATH --new PATH [--adapter DIR] [--task rg:NAME | --data FILE] --out DIR``.

Is a base update the kind Trans-PEFT addresses? Four measurements of an (old, new) base pair, cheapest first:

1. ``drift``: data-free weight drift per layer and module (`jtranspeft.analysis.drift.drift_report`), written to
   ``drift/`` (table, JSON, plot) exactly as the transfer CLI writes it.
2. ``activations``: on the task's prompts, per layer, how much the attention and FFN sub-block outputs
   moved, the overlap of the most active FFN neurons, and how strongly each base's FFN rewrites the
   residual stream (`jtranspeft.analysis.activations`). Bare bases, no adapter.
3. ``attribution``: the adapter scored on the old base with the new base's FFN, attention, or embeddings +
   norms swapped in, one group at a time, plus all-old and all-new, so the Direct Transfer change is
   attributed to components (`jtranspeft.analysis.attribution`).
4. ``sensitivity``: the task loss with one layer's FFN dropped (Trans-PEFT's dropping, one layer at a
   time) and with 10% FFN masking (`jtranspeft.analysis.sensitivity`), on the old base by default and on the
   first ``--sensitivity-limit`` items (it scores L + 1 + mask-draws times).

Scores are teacher-forced (`jtranspeft.analysis.scoring`): answer-token loss, and the share of items whose
every answer token is the argmax. Task items come from ``task`` (``rg:NAME``, the reasoning-gym eval split),
``data`` (a local file) or, by default, the adapter's own training config; the prompt template is the one
the adapter was trained with unless ``template`` says otherwise. ``out`` receives ``analyze.md``,
``analyze.json``, ``activations.png``, ``attribution.png``, ``sensitivity.png`` and ``drift/``, all at
once (written to a temporary sibling, then renamed); it must be new or empty.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from jtranspeft.analysis import SECTIONS
from jtranspeft.analysis.activations import activation_shift
from jtranspeft.analysis.attribution import swap_attribution
from jtranspeft.analysis.drift import drift_report, write_drift_report
from jtranspeft.analysis.report import format_report, plot_activations, plot_attribution, plot_sensitivity
from jtranspeft.analysis.scoring import TaskBatch, TeacherForcedScorer, load_task, task_data_config
from jtranspeft.analysis.sensitivity import ffn_sensitivity
from jtranspeft.checkpoints.loading import load_base
from jtranspeft.checkpoints.peft_format import load_peft, read_metadata
from jtranspeft.models.base import Base
from jtranspeft.peft.lora import Lora
from jtranspeft.utils.errors import InputError
from jtranspeft.utils.files import atomic_directory, json_ready


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """Which measurements (``sections``) on which task items, and their sizes (see the module docstring)."""

    sections: tuple[str, ...] = SECTIONS
    task: str | None = None  # rg:NAME (its eval split); with data None too: the adapter's training task
    data: str | None = None  # a local .json/.jsonl/.parquet file of instruction/output items
    template: str | None = None  # prompt template; None: the adapter's, else alpaca
    limit: int = 100  # task items scored
    sensitivity_limit: int | None = 16  # items scored per FFN drop (L + 1 + mask_draws scores)
    activation_limit: int = 32  # items whose prompts are compared
    batch_size: int = 8
    top_frac: float = 0.05  # top-k FFN neurons as a fraction of d_ff
    mask_p: float = 0.1  # FFN masking probability (no rescale)
    mask_draws: int = 3  # random masks averaged (0 = no masking row)
    sensitivity_base: str = "old"  # "old" | "new"
    drift_top_k: int = 16  # singular vectors compared by the drift
    seed: int = 0  # of the masking draws

    def __post_init__(self):
        object.__setattr__(self, "sections", tuple(self.sections))
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise InputError(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
        if self.task and self.data:
            raise InputError("give either a task (--task) or a data file (--data), not both")
        if self.sensitivity_base not in ("old", "new"):
            raise InputError(f"sensitivity_base must be old or new, got {self.sensitivity_base!r}")
        for name in ("limit", "activation_limit", "batch_size", "drift_top_k"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")


def measure(old: Base, new: Base, task: TaskBatch | None, lora: Lora | None, config: AnalyzeConfig,
            progress: bool = True) -> dict:
    """Run ``config.sections`` on loaded bases and task items; one JSON-ready dict (see the module docstring)."""
    sections = config.sections
    if task is None and set(sections) - {"drift"}:
        raise InputError(f"sections {sorted(set(sections) - {'drift'})} need task items (--task or --data)")
    result: dict = {"old": old.source, "new": new.source, "task": task.description if task else None,
                    "timings_s": {}}

    def timed(name, fn):
        tick = time.perf_counter()
        result[name] = fn()
        result["timings_s"][name] = round(time.perf_counter() - tick, 1)

    if "drift" in sections:
        timed("drift", lambda: drift_report(old, new, lora, top_k=config.drift_top_k))
    if "activations" in sections:
        def batches():
            for chunk in task.chunks(config.batch_size, config.activation_limit):
                yield {**chunk, "token_mask": (chunk["attention_mask"] > 0) & (chunk["loss_mask"] == 0)}

        n = min(config.activation_limit, len(task.input_ids))
        timed("activations", lambda: activation_shift(old, new, batches(), config.top_frac, progress,
                                                      total=-(-n // config.batch_size)))
        result["activations"]["items"] = n
    scorer = TeacherForcedScorer(task, config.batch_size) if task is not None else None
    if "attribution" in sections:
        timed("attribution", lambda: swap_attribution(old, new, scorer, lora, progress))
    if "sensitivity" in sections:
        base = {"old": old, "new": new}[config.sensitivity_base]
        subset = TeacherForcedScorer(task, config.batch_size, config.sensitivity_limit)
        timed("sensitivity", lambda: ffn_sensitivity(base, subset, lora, config.mask_p, config.mask_draws,
                                                     config.seed, progress))
        result["sensitivity"]["base"] = config.sensitivity_base
    return json_ready(result)


def analyze(old: Base | str | Path, new: Base | str | Path, config: AnalyzeConfig = AnalyzeConfig(),
            adapter: str | Path | None = None, *, out: str | Path | None = None, dtype: str = "float32",
            progress: bool = True) -> dict:
    """Measure an (old, new) base pair as ``config`` says; bases are `Base` objects or paths (HF dir, .gguf,
    "smollm2"), ``adapter`` an HF PEFT directory trained on ``old``. With ``out`` the report is written
    there (`write_analysis`). Returns the JSON-ready result."""
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new directory")
    old = load_base(old, dtype=dtype) if isinstance(old, (str, Path)) else old
    new = load_base(new, dtype=dtype, tokenizer=old.tokenizer is None) if isinstance(new, (str, Path)) else new
    lora = load_peft(adapter, old) if adapter else None
    trained_with = read_metadata(adapter).get("config", {}).get("data") if adapter else None
    task = None
    if set(config.sections) - {"drift"}:
        tokenizer = old.tokenizer or new.tokenizer
        if tokenizer is None:
            raise InputError(f"{old.source}: no tokenizer next to the weights of either base")
        data_cfg, split = task_data_config(config.task, config.data, config.template, config.limit, trained_with)
        task = load_task(data_cfg, split, tokenizer)
    result = measure(old, new, task, lora, config, progress)
    result["adapter"] = str(adapter) if adapter else None
    if out is not None:
        write_analysis(result, out)
    return result


def write_analysis(result: dict, out_dir: str | Path) -> Path:
    """``analyze.md``, ``analyze.json``, one PNG per section and ``drift/``, written atomically into ``out_dir``."""
    with atomic_directory(out_dir) as tmp:
        if result.get("drift"):
            write_drift_report(result["drift"], tmp / "drift")
        (tmp / "analyze.json").write_text(json.dumps(result, indent=1) + "\n")
        (tmp / "analyze.md").write_text(format_report(result))
        for name, plot in (("activations", plot_activations), ("attribution", plot_attribution),
                           ("sensitivity", plot_sensitivity)):
            if result.get(name):
                plot(result[name], tmp / f"{name}.png")
    return Path(out_dir)
