"""``python -m jtranspeft.evolve``: runs `jtranspeft.cli.evolve`.

Imported, this module calls like the library function `jtranspeft.evolve` (see `jtranspeft.cli.common.shim`).
"""

from jtranspeft.cli.common import shim

shim(__name__)
