"""``python -m jtranspeft.transfer``: runs `jtranspeft.cli.transfer`.

Imported, this module calls like the library function `jtranspeft.transfer` (see `jtranspeft.cli.common.shim`).
"""

from jtranspeft.cli.common import shim

shim(__name__)
