"""``python -m jtranspeft.experiment``: runs `jtranspeft.cli.experiment`.

Imported, this module calls like the library function `jtranspeft.run_experiment` (see `jtranspeft.cli.common.shim`).
"""

from jtranspeft.cli.common import shim

shim(__name__)
