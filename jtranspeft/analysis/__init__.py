"""Research measurements and the experiment runner: drift, activations, attribution, sensitivity, `analyze`,
and the four-setting Trans-PEFT experiment.

This file stays free of heavy imports: the CLI reads `SECTIONS` for its ``--help`` without loading JAX.
"""

SECTIONS = ("drift", "activations", "attribution", "sensitivity")  # what `analyze.analyze` can measure
