"""``python -m jtranspeft.train``: runs `jtranspeft.cli.train`.

Imported, this module calls like the library function `jtranspeft.train` (see `jtranspeft.cli.common.shim`).
"""

from jtranspeft.cli.common import shim

shim(__name__)
