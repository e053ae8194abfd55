"""``python -m jtranspeft.evaluate``: score a base model (optionally with a LoRA adapter) on a task.

Builds an `EvalConfig` from the arguments and calls `jtranspeft.evaluate` (or `evaluate_perplexity` for
``--perplexity FILE``), both in `jtranspeft.eval.evaluate`; prints a one-line JSON summary. Bad input (a
missing file, an unknown task) is one line on stderr and exit status 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

from jtranspeft.cli.common import add_logging_flags, cli_main, setup_logging, usage_name

EXAMPLES = """examples:
  # reasoning-gym task, generated offline (200 items unless --limit)
  python -m jtranspeft.evaluate --base model.gguf --task rg:basic_arithmetic --limit 50 --out runs/eval
  # GSM8K test file with a PEFT adapter merged into the base (the paper's protocol)
  python -m jtranspeft.evaluate --base ./Llama-3.2-1B --adapter runs/lora --merge \\
      --data gsm8k_test.jsonl --task-type gsm8k --out runs/eval-gsm8k
  # commonsense by log-likelihood of each label instead of generation
  python -m jtranspeft.evaluate --base ./model --data boolq_test.json --task-type boolq --scoring loglik
  # multiple choice from JSONL rows {"question", "choices": [...], "answer": 0}
  python -m jtranspeft.evaluate --base ./model --data mc.jsonl --task-type choice
  # perplexity of a text file
  python -m jtranspeft.evaluate --base model.gguf --perplexity shakespeare.txt --window 512
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see --help)."""
    parser = argparse.ArgumentParser(prog=usage_name("evaluate"), description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True,
                        help='base model: HF checkpoint directory, .gguf file, hub id or "smollm2"')
    parser.add_argument("--adapter", help="adapter directory of any family: HF PEFT LoRA / DoRA / SHiRA, jtranspeft "
                                           "RoSA or bottleneck (applied unmerged unless --merge)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base before decoding "
                                                             "(not for bottleneck adapters)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", "--task-type", dest="task",
                      help="gsm8k, math, boolq, piqa, siqa, hellaswag, winogrande, arc_e, arc_c, obqa (these "
                           "read --data), choice (JSONL multiple choice, reads --data) or rg:<reasoning-gym name>")
    what.add_argument("--perplexity", metavar="FILE", help="report the perplexity of this UTF-8 text file")
    parser.add_argument("--data", metavar="FILE", help="the task's test file")
    parser.add_argument("--limit", type=int, help="score the first N items (reasoning-gym: generate N; default 200)")
    parser.add_argument("--seed", type=int, default=42,
                        help="reasoning-gym seed; items come from the training config's eval split for this seed")
    parser.add_argument("--rg-kwargs", type=json.loads, default={}, metavar="JSON",
                        help="reasoning-gym generator arguments, as the training config's data.rg_kwargs, "
                             "e.g. '{\"max_terms\": 3}'")
    parser.add_argument("--out", help="output directory (default: eval-<task>)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="generation budget (default: gsm8k 1024, math 2048, commonsense 32, others 512)")
    parser.add_argument("--scoring", choices=("generate", "loglik"), default=None,
                        help="generate (default) or loglik (commonsense tasks; always for 'choice')")
    parser.add_argument("--template", choices=("alpaca", "commonsense", "chat", "plain"),
                        help="prompt template, as in training (default: commonsense for commonsense tasks, "
                             "else alpaca)")
    parser.add_argument("--window", type=int, default=1024, help="perplexity window in tokens (default 1024)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="storage dtype of the base weights (default float32)")
    add_logging_flags(parser)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    from pathlib import Path

    from jtranspeft.checkpoints.loading import MODEL_NAMES
    from jtranspeft.eval.evaluate import EvalConfig, evaluate, evaluate_perplexity

    if not Path(args.base).exists() and args.base.count("/") != 1 and args.base not in MODEL_NAMES:
        raise FileNotFoundError(f"--base {args.base}: no such file or directory")  # "org/name" may be a hub id
    common = dict(adapter=args.adapter, merge=args.merge, dtype=args.dtype)
    if args.perplexity:
        results = evaluate_perplexity(args.base, args.perplexity, window=args.window, batch_size=args.batch_size,
                                      out=args.out or "eval-perplexity", **common)
    else:
        config = EvalConfig(task=args.task, data=args.data, limit=args.limit, seed=args.seed,
                            rg_kwargs=args.rg_kwargs, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, scoring=args.scoring, template=args.template)
        results = evaluate(args.base, config, out=args.out or f"eval-{args.task.replace(':', '_')}", **common)
    summary = {k: results[k] for k in ("task", "accuracy", "ci_low", "ci_high", "n", "perplexity") if k in results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
