"""``python -m jtranspeft.experiment``: runs `jtranspeft.cli.experiment`.

Imported, it runs nothing (the library function is `jtranspeft.run_experiment`).
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.experiment import main

    sys.exit(main())
