"""``python -m jtranspeft.transfer``: move a LoRA adapter onto an updated base (verdict, outputs, drift).

Checks the arguments, runs `jtranspeft.migration.transfer.run_transfer` (load the bases, move the adapter,
write it, score fidelity) and prints what it did; then, for ``--drift-report``, the drift report
(`jtranspeft.analysis.drift`, which sits above `migration`), so the moved adapter is on disk before the
report starts. See docs/transfer.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

from jtranspeft.cli.common import add_logging_flags, cli_main, setup_logging, usage_name
from jtranspeft.migration import DORA_MAGNITUDE, METHODS
from jtranspeft.utils.errors import EXIT_INCOMPATIBLE


EPILOG = textwrap.dedent("""\
    verdicts and exit codes:
      identical     the new base is the adapter's own base (same fingerprint)          exit 0
      transfer      same architecture, different weights                                exit 0
                    ("transfer (unverified: ...)" for an adapter with no recorded base
                     fingerprint and no --old-base: checked from tensor shapes only)
      incompatible  family, dimension, layer count or target module does not fit;     exit 3
                    the reasons are printed and NOTHING is written
      bad input (missing file, unreadable base, bad option, existing output dir)        exit 2

    examples:
      # verdict only (dry run)
      python -m jtranspeft.transfer --adapter runs/qwen2-math/adapter --new-base models/Qwen2.5-7B
      # move the adapter and also write a merged checkpoint of the new base
      python -m jtranspeft.transfer --adapter runs/a/adapter --new-base models/Qwen2.5-7B \\
          --out moved/adapter --merge moved/merged
      # project onto the new weights' top-64 singular subspaces, with a drift report
      python -m jtranspeft.transfer --adapter runs/a/adapter --old-base models/Qwen2-7B \\
          --new-base models/Qwen2.5-7B --method project --project-k 64 --out moved/a --drift-report drift/
      # a deeper new base: adapter layer i -> new layer 2i
      python -m jtranspeft.transfer --adapter runs/a/adapter --new-base deeper/ --layer-map 0:0,1:2,2:4 --out moved/b
      # label-free check: does new base + moved adapter still answer like old base + adapter?
      python -m jtranspeft.transfer --adapter runs/a/adapter --old-base smollm2 --new-base runs/evolve/x/base \
          --method rescale --fidelity probes.txt --out moved/c
    """)


def parse_layer_map(text: str) -> dict[int, int]:
    """Parse "0:0,1:2,..." (adapter layer : new-base layer) into {0: 0, 1: 2, ...}."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", item)
        if match is None:
            raise argparse.ArgumentTypeError(f"layer map item {item!r} is not OLD:NEW (e.g. 0:0,1:2)")
        old, new = int(match[1]), int(match[2])
        if old in mapping:
            raise argparse.ArgumentTypeError(f"layer map lists adapter layer {old} twice")
        mapping[old] = new
    if not mapping:
        raise argparse.ArgumentTypeError("layer map is empty")
    return mapping


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m jtranspeft.transfer``."""
    p = argparse.ArgumentParser(
        prog=usage_name("transfer"), formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Move a LoRA adapter (HF PEFT format) onto an updated base: verdict, moved adapter, "
                    "optional merged checkpoint and drift report. See docs/transfer.md.")
    p.add_argument("--adapter", required=True, help="HF PEFT adapter directory (from jtranspeft or peft)")
    p.add_argument("--new-base", required=True, help="HF checkpoint directory or .gguf file of the new base")
    p.add_argument("--old-base", help="the base the adapter was trained on (identity check for adapters without a "
                                      "recorded fingerprint; needed for --drift-report)")
    p.add_argument("--out", help="write the moved adapter here (PEFT format; must not exist)")
    p.add_argument("--merge", help="write the new base with the adapter merged in (HF checkpoint + tokenizer)")
    p.add_argument("--layer-map", type=parse_layer_map, help="OLD:NEW,... adapter layer -> new-base layer, for "
                                                             "bases of different depth")
    p.add_argument("--method", choices=METHODS, default="reuse",
                   help="reuse: same tensors (default); project: onto the new weights' top-k singular subspaces; "
                        "rescale: keep ||s A B|| / ||W|| per module and layer")
    p.add_argument("--project-k", type=int, help="subspace size for --method project (default: min(in, out) // 2)")
    p.add_argument("--dora-magnitude", choices=DORA_MAGNITUDE, default="keep",
                   help="DoRA adapters only. keep: the magnitude vectors as they are (default); renorm: re-normalised "
                        "against the new base so each column keeps its old factor m / ||W + s A B|| (needs --old-base)")
    p.add_argument("--drift-report", help="write drift.txt / drift.json / drift.png here (needs --old-base)")
    p.add_argument("--top-k", type=int, default=16, help="singular directions compared in the drift report")
    p.add_argument("--fidelity", metavar="PROMPTS",
                   help="label-free check of the moved adapter (needs --old-base): a .txt file (one prompt per "
                        "line) or .jsonl (a 'prompt' field per row); prints KL and agreement with old base + adapter "
                        "and writes fidelity.json into --out")
    p.add_argument("--fidelity-tokens", type=int, default=32, help="greedy teacher tokens per probe prompt")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="storage dtype the bases are loaded (and merged) in; auto: the checkpoint's own dtype "
                        "(config.json), float32 for GGUF")
    add_logging_flags(p)
    return p


def _print_result(result, stream) -> None:
    print(f"verdict: {result.label}", file=stream)
    print(f"  adapter's base: {result.old_description}", file=stream)
    print(f"  new base:       {result.new_description}", file=stream)
    for reason in result.reasons:
        print(f"  - {reason}", file=stream)


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 3 incompatible)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if args.drift_report and not args.old_base:
        raise ValueError("--drift-report needs --old-base (drift compares the two bases' weights)")
    if args.fidelity and not args.old_base:
        raise ValueError("--fidelity needs --old-base (the teacher is the old base with the adapter)")
    if args.dora_magnitude == "renorm" and not args.old_base:
        raise ValueError("--dora-magnitude renorm needs --old-base (the old base's column norms)")
    from jtranspeft.migration.migrate import read_prompt_file

    prompts = [text for _, text in read_prompt_file(args.fidelity)] if args.fidelity else None
    for name in ("project_k", "top_k", "fidelity_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for target in (args.out, args.merge, args.drift_report):
        if target and Path(target).exists() and (not Path(target).is_dir() or any(Path(target).iterdir())):
            raise FileExistsError(f"{target}: already exists and is not empty; choose a new directory")
    from jtranspeft.migration.transfer import run_transfer

    run = run_transfer(args.adapter, args.new_base, args.old_base, out=args.out, merge=args.merge,
                       layer_map=args.layer_map, method=args.method, project_k=args.project_k,
                       dora_magnitude=args.dora_magnitude, prompts=prompts, fidelity_tokens=args.fidelity_tokens,
                       dtype=args.dtype)
    if not run.result.compatible:
        _print_result(run.result, sys.stderr)
        print("nothing written", file=sys.stderr)
        return EXIT_INCOMPATIBLE
    _print_result(run.result, sys.stdout)
    print(f"  method: {args.method}", file=sys.stdout)
    if run.fidelity:
        scores = run.fidelity
        print(f"fidelity on {scores['prompts']} prompts: KL {scores['kl']:.4f} nats/token, top-1 agreement "
              f"{scores['top1']:.3f}, greedy exact {scores['exact']:.3f}, prefix {scores['prefix']:.3f}")
    for what, target in (("adapter", args.out), ("merged checkpoint", args.merge)):
        if target:
            print(f"wrote {what}: {target}", flush=True)
    if args.drift_report:
        from jtranspeft.analysis.drift import drift_report, format_drift_table, write_drift_report

        report = drift_report(run.old_base, run.new_base, lora=run.result.source_lora, top_k=args.top_k,
                              layer_map=args.layer_map)
        print(format_drift_table(report))
        write_drift_report(report, args.drift_report)
        print(f"wrote drift report: {args.drift_report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
