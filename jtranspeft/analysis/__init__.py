"""Research measurements: drift, activations, attribution, sensitivity, `analyze`, gates and paired statistics
(the four-setting experiment that uses them: `jtranspeft.experiments`).

This file stays free of heavy imports: the CLI reads `SECTIONS` for its ``--help`` without loading JAX.
"""

SECTIONS = ("drift", "activations", "attribution", "sensitivity")  # what `analyze.analyze` can measure
