"""``python -m jtranspeft.analyze --old PATH --new PATH [--adapter DIR] [--task rg:NAME | --data FILE] --out DIR``.

Is a base update the kind Trans-PEFT addresses? Four measurements of an (old, new) base pair, cheapest first:

1. ``drift``: data-free weight drift per layer and module (`jtranspeft.drift.drift_report`), written to
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
every answer token is the argmax. Task items come from ``--task rg:NAME`` (reasoning-gym eval split),
``--data FILE`` or, by default, the adapter's own training config; the prompt template is the one the
adapter was trained with unless ``--template`` says otherwise. ``--out`` receives ``analyze.md``,
``analyze.json``, ``activations.png``, ``attribution.png``, ``sensitivity.png`` and ``drift/``, all at
once (written to a temporary sibling, then renamed); it must be new or empty.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jtranspeft.analysis.activations import activation_shift
from jtranspeft.analysis.attribution import swap_attribution
from jtranspeft.analysis.report import format_report, plot_activations, plot_attribution, plot_sensitivity
from jtranspeft.analysis.sensitivity import ffn_sensitivity
from jtranspeft.analysis.scoring import TaskBatch, TeacherForcedScorer, load_task, task_data_config
from jtranspeft.base import Base, load_base
from jtranspeft.checkpoints.peft_format import load_peft, read_metadata
from jtranspeft.drift import json_ready, atomic_directory, drift_report, write_drift_report
from jtranspeft.peft.lora import Lora
from jtranspeft.train import resolve_model_path

SECTIONS = ("drift", "activations", "attribution", "sensitivity")
EXAMPLES = """python -m jtranspeft.analyze --old smollm2 --new runs/evolve/smollm2_uniform/base \\
    --adapter runs/quickstart/adapter --out runs/analysis/uniform
python -m jtranspeft.analyze --old smollm2 --new runs/evolve/smollm2_ffn/base --task rg:chain_sum --limit 100 \\
    --out runs/analysis/ffn_zero_shot
python -m jtranspeft.analyze --old old_dir --new new_dir --data items.jsonl --template alpaca \\
    --skip drift,sensitivity --out runs/analysis/quick"""


def analyze(old: Base, new: Base, task: TaskBatch | None, lora: Lora | None = None, *,
            sections=SECTIONS, batch_size: int = 8, activation_limit: int = 32, top_frac: float = 0.05,
            mask_p: float = 0.1, mask_draws: int = 3, sensitivity_base: str = "old",
            sensitivity_limit: int | None = 16, drift_top_k: int = 16,
            seed: int = 0, progress: bool = True) -> dict:
    """Run the chosen ``sections`` (see the module docstring) and return one JSON-ready dict."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if task is None and set(sections) - {"drift"}:
        raise ValueError(f"sections {sorted(set(sections) - {'drift'})} need task items (--task or --data)")
    result: dict = {"old": old.source, "new": new.source, "task": task.description if task else None,
                    "timings_s": {}}

    def timed(name, fn):
        tick = time.perf_counter()
        result[name] = fn()
        result["timings_s"][name] = round(time.perf_counter() - tick, 1)

    if "drift" in sections:
        timed("drift", lambda: drift_report(old, new, lora, top_k=drift_top_k))
    if "activations" in sections:
        def batches():
            for chunk in task.chunks(batch_size, activation_limit):
                yield {**chunk, "token_mask": (chunk["attention_mask"] > 0) & (chunk["loss_mask"] == 0)}

        n = min(activation_limit, len(task.input_ids))
        timed("activations", lambda: activation_shift(old, new, batches(), top_frac, progress,
                                                      total=-(-n // batch_size)))
        result["activations"]["items"] = n
    scorer = TeacherForcedScorer(task, batch_size) if task is not None else None
    if "attribution" in sections:
        timed("attribution", lambda: swap_attribution(old, new, scorer, lora, progress))
    if "sensitivity" in sections:
        base = {"old": old, "new": new}[sensitivity_base]
        subset = TeacherForcedScorer(task, batch_size, sensitivity_limit)
        timed("sensitivity", lambda: ffn_sensitivity(base, subset, lora, mask_p, mask_draws, seed, progress))
        result["sensitivity"]["base"] = sensitivity_base
    return json_ready(result)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jtranspeft.analyze", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Where does a base update differ, and which part of it costs an adapter its task score?",
        epilog="sections: drift (weights), activations (prompts), attribution (component swaps), sensitivity\n"
               "(per-layer FFN drop + masking). See docs/research.md.\n\nexamples:\n"
               + "\n".join(f"  {line}" for line in EXAMPLES.splitlines()))
    parser.add_argument("--old", required=True, help='old base: HF dir, .gguf, or "smollm2"')
    parser.add_argument("--new", required=True, help="new (updated) base, same architecture")
    parser.add_argument("--adapter", help="LoRA adapter dir trained on the old base (PEFT format)")
    task = parser.add_mutually_exclusive_group()
    task.add_argument("--task", help="reasoning-gym task, rg:NAME (its eval split)")
    task.add_argument("--data", help="local .json/.jsonl/.parquet file of instruction/output items")
    parser.add_argument("--template", help="prompt template (default: the adapter's, else alpaca)")
    parser.add_argument("--limit", type=int, default=100, help="task items scored (default 100)")
    parser.add_argument("--sensitivity-limit", type=int, default=16,
                        help="items scored per FFN drop (L + 1 + mask-draws scores; default 16)")
    parser.add_argument("--activation-limit", type=int, default=32, help="items whose prompts are compared")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-frac", type=float, default=0.05, help="top-k FFN neurons as a fraction of d_ff")
    parser.add_argument("--mask-p", type=float, default=0.1, help="FFN masking probability (no rescale)")
    parser.add_argument("--mask-draws", type=int, default=3, help="random masks averaged (0 = skip masking)")
    parser.add_argument("--sensitivity-base", choices=("old", "new"), default="old")
    parser.add_argument("--drift-top-k", type=int, default=16, help="singular vectors compared by the drift")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip ({', '.join(SECTIONS)})")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the masking draws")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    return parser


def main(argv=None) -> int:
    """CLI entry point; returns the process exit status (2: bad arguments or inputs)."""
    args = _parser().parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        if skip - set(SECTIONS):
            raise ValueError(f"--skip: unknown sections {sorted(skip - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
        sections = [s for s in SECTIONS if s not in skip]
        old = load_base(resolve_model_path(args.old), dtype=args.dtype)
        new = load_base(resolve_model_path(args.new), dtype=args.dtype, tokenizer=old.tokenizer is None)
        lora, trained_with = None, None
        if args.adapter:
            lora = load_peft(args.adapter, old)
            trained_with = read_metadata(args.adapter).get("config", {}).get("data")
        task = None
        if set(sections) - {"drift"}:
            tokenizer = old.tokenizer or new.tokenizer
            if tokenizer is None:
                raise ValueError(f"{args.old}: no tokenizer next to the weights of either base")
            data_cfg, split = task_data_config(args.task, args.data, args.template, args.limit, trained_with)
            task = load_task(data_cfg, split, tokenizer)
        result = analyze(old, new, task, lora, sections=sections, batch_size=args.batch_size,
                         activation_limit=args.activation_limit, top_frac=args.top_frac, mask_p=args.mask_p,
                         mask_draws=args.mask_draws, sensitivity_base=args.sensitivity_base,
                         sensitivity_limit=args.sensitivity_limit,
                         drift_top_k=args.drift_top_k, seed=args.seed, progress=not args.no_progress)
        result["adapter"] = args.adapter
        write_analysis(result, args.out)
    except (FileNotFoundError, FileExistsError, ValueError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
