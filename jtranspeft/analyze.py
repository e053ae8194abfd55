"""``python -m jtranspeft.analyze``: runs `jtranspeft.cli.analyze`.

Imported, this module calls like the library function `jtranspeft.analyze` (see `jtranspeft.cli.common.shim`).
"""

from jtranspeft.cli.common import shim

shim(__name__)
