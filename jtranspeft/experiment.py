"""``python -m jtranspeft.experiment``: runs `jtranspeft.cli.experiment`; imported, calls like `jtranspeft.run_experiment`."""

from jtranspeft.cli.common import shim

shim(__name__)
