"""Moving adapters onto updated bases: the compatibility verdict and the moved adapter (`transfer`).

This file stays free of heavy imports: the CLI reads `METHODS` for its ``--help`` without loading JAX.
"""

METHODS = ("reuse", "project", "rescale")  # how `transfer.transfer` re-shapes a moved adapter
DORA_MAGNITUDE = ("keep", "renorm")  # what `transfer.transfer` does with a DoRA adapter's magnitude vectors
