"""``python -m jtranspeft.transfer``: runs `jtranspeft.cli.transfer`; imported, calls like the library function `jtranspeft.transfer`."""

from jtranspeft.cli.common import shim

shim(__name__)
