"""The command-line tools: argument parsing and printing only; each calls one library function.

``python -m jtranspeft.<tool>`` and the console script ``jtranspeft-<tool>`` run ``jtranspeft.cli.<tool>.main``.
Nothing outside this package (and the ``python -m`` shims) imports from it.
"""
