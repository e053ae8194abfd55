"""The four-setting Trans-PEFT experiment above the measurements it uses: `runner` (the pieces, their cache
and the gated choice of the update) and `report` (rows, paired comparisons, tables, plot, README block).

This file stays free of heavy imports: the CLI's ``--help`` must not load JAX.
"""
