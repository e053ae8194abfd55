"""``python -m jtranspeft.analyze --old PATH --new PATH [--adapter DIR] [--task rg:NAME | --data FILE] --out DIR``.

Builds an `AnalyzeConfig` from the arguments and calls `jtranspeft.analyze` (`jtranspeft.analysis.analyze`),
which writes the report into ``--out``; prints the markdown report.
"""

from __future__ import annotations

import argparse
import sys

from jtranspeft.analysis import SECTIONS
from jtranspeft.cli.common import add_logging_flags, cli_main, setup_logging, usage_name

EXAMPLES = """python -m jtranspeft.analyze --old smollm2 --new runs/evolve/smollm2_uniform/base \\
    --adapter runs/quickstart/adapter --out runs/analysis/uniform
python -m jtranspeft.analyze --old smollm2 --new runs/evolve/smollm2_ffn/base --task rg:chain_sum --limit 100 \\
    --out runs/analysis/ffn_zero_shot
python -m jtranspeft.analyze --old old_dir --new new_dir --data items.jsonl --template alpaca \\
    --skip drift,sensitivity --out runs/analysis/quick"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=usage_name("analyze"), formatter_class=argparse.RawDescriptionHelpFormatter,
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
    add_logging_flags(parser)
    return parser


@cli_main
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status (2: bad arguments or inputs)."""
    args = _parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        raise ValueError(f"--skip: unknown sections {sorted(skip - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    from jtranspeft.analysis.analyze import AnalyzeConfig, analyze
    from jtranspeft.analysis.report import format_report

    config = AnalyzeConfig(
        sections=tuple(s for s in SECTIONS if s not in skip), task=args.task, data=args.data,
        template=args.template, limit=args.limit, sensitivity_limit=args.sensitivity_limit,
        activation_limit=args.activation_limit, batch_size=args.batch_size, top_frac=args.top_frac,
        mask_p=args.mask_p, mask_draws=args.mask_draws, sensitivity_base=args.sensitivity_base,
        drift_top_k=args.drift_top_k, seed=args.seed)
    result = analyze(args.old, args.new, config, args.adapter, out=args.out, dtype=args.dtype,
                     progress=not args.no_progress)
    print(format_report(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
