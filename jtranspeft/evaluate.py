"""``python -m jtranspeft.evaluate``: runs `jtranspeft.cli.evaluate`; imported, calls like the library function `jtranspeft.evaluate`."""

from jtranspeft.cli.common import shim

shim(__name__)
