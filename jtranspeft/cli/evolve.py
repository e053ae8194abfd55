"""``python -m jtranspeft.evolve --config FILE [key=value ...]``: make an updated base by continued pre-training.

Calls `jtranspeft.evolve` (`jtranspeft.training.evolve`) with the `EvolveConfig` built from the files and
overrides; prints the run's summary as JSON. ``python -m jtranspeft.evolve interpolate --old A --new B
--lambdas 0.5 1 --out DIR`` saves interpolated / extrapolated bases (`jtranspeft.training.evolve.interpolate`).
"""

from __future__ import annotations

import sys

from jtranspeft.cli.common import cli_main, run_config_job, usage_name

EXAMPLES = """python -m jtranspeft.evolve --config configs/evolve/smollm2_uniform.yaml
python -m jtranspeft.evolve --config configs/evolve/smollm2_ffn.yaml output_dir=runs/ffn_lr3 train.lr=3e-4
python -m jtranspeft.evolve --config configs/evolve/base.yaml model.path=/ckpt/Qwen2-0.5B \\
    corpus.sources.shakespeare.weight=1 corpus.sources.notes.source=notes.txt groups.attention=0
# rerun the same command to resume from the newest checkpoint in output_dir
python -m jtranspeft.evolve interpolate --old smollm2 --new runs/evolve/smollm2_ffn/base \\
    --lambdas 0.5 1 1.5 2 --out runs/evolve/smollm2_ffn/interpolated"""

INTERPOLATE_EXAMPLES = """python -m jtranspeft.evolve interpolate --old smollm2 --new runs/evolve/smollm2_ffn/base \\
    --lambdas 0.5 1 1.5 2 --out runs/evolve/smollm2_ffn/interpolated
# writes DIR/lambda_0.5, DIR/lambda_1, ...: HF bases W_old + lambda (W_new - W_old); existing ones are kept"""


def interpolate_main(argv) -> int:
    """``interpolate``: save W_old + lambda (W_new - W_old) for each lambda; prints {lambda: directory}."""
    import argparse
    import json

    from jtranspeft.cli.common import add_logging_flags, setup_logging

    parser = argparse.ArgumentParser(prog=usage_name("evolve") + " interpolate", epilog=INTERPOLATE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Interpolate (or extrapolate) between an old and an updated base "
                                                 "without training: one saved base per lambda.")
    parser.add_argument("--old", required=True, help="the old base: HF directory, GGUF file or 'smollm2'")
    parser.add_argument("--new", required=True, help="the updated base of the same architecture")
    parser.add_argument("--lambdas", type=float, nargs="+", required=True,
                        help="0 = old, 1 = new, > 1 extrapolates the update")
    parser.add_argument("--out", required=True, help="directory receiving lambda_<value>/ per lambda")
    add_logging_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    from jtranspeft.training.evolve import interpolate

    print(json.dumps(interpolate(args.old, args.new, args.lambdas, args.out), indent=2))
    return 0


@cli_main
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status (see `jtranspeft.utils.errors`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["interpolate"]:
        return interpolate_main(argv[1:])
    return run_config_job(argv, prog=usage_name("evolve"), examples=EXAMPLES,
                          description="Continued pre-training of a base model (all weights, per-group learning "
                                      "rates) to make an updated base.",
                          config="jtranspeft.training.config:EvolveConfig", job="jtranspeft.training.evolve:evolve")


if __name__ == "__main__":
    sys.exit(main())
