"""``python -m jtranspeft.analyze``: runs `jtranspeft.cli.analyze`; imported, calls like the library function `jtranspeft.analyze`."""

from jtranspeft.cli.common import shim

shim(__name__)
