"""``python -m jtranspeft.migrate --adapters DIR [DIR ...] --old-base A --new-base B --out DIR``: a fleet.

Calls `jtranspeft.migrate` (`jtranspeft.migration.migrate`): per adapter the verdict, then copy ->
training-free -> distillation until the label-free fidelity reaches the threshold; prints the report table.
"""

from __future__ import annotations

import argparse
import sys

from jtranspeft.cli.common import add_logging_flags, cli_main, setup_logging, usage_name
from jtranspeft.utils.errors import EXIT_INCOMPATIBLE, EXIT_RETRAIN

EPILOG = f"""exit status:
  0  every compatible adapter migrated (some rung reached the threshold)
  2  bad input (a missing adapter directory, an unreadable base, no probe prompts for an adapter, a --prompts
     file with fewer than 2 distinct lines or a line longer than the old base's context)
  3  some adapter is incompatible with the new base (reported, nothing written for it)
  {EXIT_RETRAIN}  no incompatible adapter, but some need retraining (no rung reached the threshold)
  (3 wins over {EXIT_RETRAIN}); rerun the same command after a kill: finished adapters are skipped

examples:
  python -m jtranspeft.migrate --adapters runs/math/adapter runs/code/adapter --old-base smollm2 \\
      --new-base runs/evolve/smollm2_broad/base --out migrated/
  # adapters trained elsewhere carry no probe prompts: give task instructions, one per line
  python -m jtranspeft.migrate --adapters peft_adapters/* --old-base models/Qwen2-7B --new-base models/Qwen2.5-7B \\
      --prompts probes.txt --threshold 0.1 --no-distill --out migrated/
  # ... and distil them too: LoRA settings from adapter_config.json, the rest defaults (docs/migrate.md)
  python -m jtranspeft.migrate --adapters peft_adapters/* --old-base models/Qwen2-7B --new-base models/Qwen2.5-7B \\
      --prompts probes.txt --template chat --distill-lr 2e-4 --distill-batch-size 4 --out migrated/
  # eight adapters at a time: shared fidelity passes, the distillations trained as one fleet
  python -m jtranspeft.migrate --adapters runs/*/adapter --old-base smollm2 --new-base new_base/ \\
      --fleet-batch 8 --out migrated/
  # judge by top-1 agreement with the teacher (distilled adapters are over-confident, which KL punishes)
  python -m jtranspeft.migrate --adapters runs/*/adapter --old-base smollm2 --new-base new_base/ \\
      --accept top1 --threshold 0.8 --out migrated/
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m jtranspeft.migrate``."""
    from jtranspeft.data.config import TEMPLATES
    from jtranspeft.migration.distill import FOREIGN_DEFAULTS
    from jtranspeft.migration.migrate import ACCEPT, EXPORTS, MigrateConfig
    from jtranspeft.training import DISTILL_LOSSES

    d = MigrateConfig()
    p = argparse.ArgumentParser(
        prog=usage_name("migrate"), formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Migrate a fleet of adapters (LoRA, DoRA, SHiRA, RoSA, bottleneck) to an updated base, each by "
                    "the cheapest rung of copy -> training-free (project, rescale: LoRA and DoRA only; skipped, "
                    "with the reason, for other families) -> Trans-LoRA distillation into the adapter's own family "
                    "whose label-free fidelity (KL or top-1 agreement with old base + adapter) reaches the "
                    "threshold. See docs/migrate.md.")
    p.add_argument("--adapters", nargs="+", required=True, help="HF PEFT adapter directories")
    p.add_argument("--old-base", required=True, help="the base the adapters were trained on ('smollm2', HF dir, .gguf)")
    p.add_argument("--new-base", required=True, help="the updated base (HF dir or .gguf)")
    p.add_argument("--out", required=True, help="output directory (report.md/.json/.png, one folder per adapter)")
    p.add_argument("--prompts", help="probe instructions (.txt: one per line; at least 2 distinct) for adapters "
                                     "without stored ones")
    p.add_argument("--accept", choices=sorted(ACCEPT), default=d.accept,
                   help="the fidelity measure that decides: mean KL to the teacher (at or below the threshold) or "
                        f"top-1 agreement with it (at or above) (default {d.accept})")
    p.add_argument("--threshold", type=float,
                   help="the measure's threshold (default: " + ", ".join(f"{k} {v[2]}" for k, v in ACCEPT.items())
                        + ")")
    p.add_argument("--methods", nargs="+", default=list(d.methods),
                   help="training-free methods tried (on the families they apply to)")
    p.add_argument("--no-distill", action="store_true", help="stop after the training-free rung")
    p.add_argument("--distill-samples", type=int, default=d.distill_samples,
                   help="synthetic prompts for distillation")
    p.add_argument("--distill-steps", type=int, default=d.distill_steps, help="distillation training steps")
    p.add_argument("--distill-lr", type=float,
                   help="distillation learning rate (default: the adapter's own; made elsewhere: "
                        f"{FOREIGN_DEFAULTS['train']['lr']:g})")
    p.add_argument("--distill-batch-size", type=int,
                   help="distillation batch size (default: the adapter's own; made elsewhere: "
                        f"{FOREIGN_DEFAULTS['train']['batch_size']})")
    p.add_argument("--distill-max-length", type=int,
                   help="distillation tokens per example (default: the adapter's own; made elsewhere: "
                        f"{FOREIGN_DEFAULTS['data']['max_length']})")
    p.add_argument("--distill-loss", choices=DISTILL_LOSSES, default=d.distill_loss,
                   help="what the student learns: the teacher's sampled tokens (cross entropy), its next-token "
                        f"distributions (KL; --distill-top-k), or a mix (default {d.distill_loss})")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help=f"softmax temperature of the logits and mix losses (default {d.distill_temperature:g})")
    p.add_argument("--distill-top-k", type=int, metavar="K", default=d.distill_top_k,
                   help="logits and mix losses: store the teacher's K most likely next tokens (and the rest of its "
                        "mass as one bucket) once before training; 0 runs the teacher beside the student in every "
                        f"step instead (default {d.distill_top_k})")
    p.add_argument("--synthesis-shots", type=int, default=d.synthesis_shots, metavar="N",
                   help=f"seed instructions shown to the new base per synthetic prompt it writes (default "
                        f"{d.synthesis_shots})")
    p.add_argument("--synthesis-temperature", type=float, default=d.synthesis_temperature, metavar="T",
                   help=f"sampling temperature of the synthetic prompts (default {d.synthesis_temperature:g})")
    p.add_argument("--template", choices=TEMPLATES, default=d.template,
                   help="prompt template of adapters made elsewhere (no recorded training config): --prompts are "
                        f"rendered in it and distillation trains in it (default {d.template})")
    p.add_argument("--discriminator", action="store_true",
                   help="filter the synthetic prompts with a real-vs-synthetic LoRA trained on the old base (Trans-LoRA)")
    p.add_argument("--probe-limit", type=int, default=d.probe_limit, help="probe prompts per adapter")
    p.add_argument("--export", nargs="+", choices=sorted(EXPORTS), default=[], metavar="FORMAT",
                   help="also write each migrated adapter as FORMAT beside its PEFT directory: gguf-lora = "
                        "<name>/adapter.gguf for llama.cpp / ollama (LoRA adapters only; others: merge instead)")
    p.add_argument("--fleet-batch", type=int, default=d.fleet_batch, metavar="K",
                   help="adapters that climb together: LoRA adapters share the fidelity passes (one base pass for "
                        "all) and, when their distillation settings agree, train in one step, each on its own "
                        f"rows (default {d.fleet_batch}; docs/migrate.md)")
    add_logging_flags(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (see the epilog)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    from jtranspeft.migration.migrate import MigrateConfig, format_report, migrate

    names = ("accept", "threshold", "distill_samples", "distill_steps", "distill_lr", "distill_batch_size",
             "distill_max_length", "distill_loss", "distill_temperature", "distill_top_k", "synthesis_shots",
             "synthesis_temperature", "template", "probe_limit", "discriminator", "fleet_batch")
    if args.distill_top_k == 0:  # the teacher beside the student
        args.distill_top_k = None
    config = MigrateConfig(**{name: getattr(args, name) for name in names}, methods=tuple(args.methods),
                           distill=not args.no_distill, export=tuple(args.export))
    report = migrate(args.adapters, args.old_base, args.new_base, args.out, config, args.prompts,
                     progress=not args.quiet)
    print(format_report(report))
    print(f"written to {args.out}/report.md, report.json, report.png")
    statuses = {r["status"] for r in report["adapters"]}
    return EXIT_INCOMPATIBLE if "incompatible" in statuses else EXIT_RETRAIN if "retrain" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
