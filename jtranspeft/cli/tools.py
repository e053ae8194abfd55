"""The tools, listed once: each is ``python -m jtranspeft.<tool>`` (an entry module at the top of the package),
the console script ``jtranspeft-<tool>`` (setup.py) and ``jtranspeft.cli.<tool>.main``.

This file imports nothing, so setup.py reads it (`runpy.run_path`) without importing jtranspeft or JAX.
"""

TOOLS = ("train", "evolve", "transfer", "evaluate", "analyze", "experiment", "migrate", "export")
