"""``python -m jtranspeft.migrate``: runs `jtranspeft.cli.migrate`.

Imported, this module calls like the library function `jtranspeft.migrate` (see `jtranspeft.cli.common.shim`).
"""

from jtranspeft.cli.common import shim

shim(__name__)
