"""``python -m jtranspeft.evolve --config FILE [key=value ...]``: make an updated base by continued pre-training.

Calls `jtranspeft.evolve` (`jtranspeft.training.evolve`) with the `EvolveConfig` built from the files and
overrides; prints the run's summary as JSON.
"""

from __future__ import annotations

import sys

from jtranspeft.cli.common import cli_main, run_config_job

EXAMPLES = """python -m jtranspeft.evolve --config configs/evolve/smollm2_uniform.yaml
python -m jtranspeft.evolve --config configs/evolve/smollm2_ffn.yaml output_dir=runs/ffn_lr3 train.lr=3e-4
python -m jtranspeft.evolve --config configs/evolve/base.yaml model.path=/ckpt/Qwen2-0.5B \\
    corpus.sources.shakespeare.weight=1 corpus.sources.notes.source=notes.txt groups.attention=0
# rerun the same command to resume from the newest checkpoint in output_dir"""


@cli_main
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status (see `jtranspeft.utils.errors`)."""
    return run_config_job(argv, prog="python -m jtranspeft.evolve", examples=EXAMPLES,
                          description="Continued pre-training of a base model (all weights, per-group learning "
                                      "rates) to make an updated base.",
                          config="jtranspeft.training.config:EvolveConfig", job="jtranspeft.training.evolve:evolve")


if __name__ == "__main__":
    sys.exit(main())
