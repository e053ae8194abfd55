"""``python -m jtranspeft.evaluate``: runs `jtranspeft.cli.evaluate`.

Imported, this module calls like the library function `jtranspeft.evaluate` (see `jtranspeft.cli.common.shim`).
"""

from jtranspeft.cli.common import shim

shim(__name__)
