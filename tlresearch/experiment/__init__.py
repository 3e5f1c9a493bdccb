"""Running experiments: the command line (`cli`, behind `python -m tlresearch.run`), grids of
cells with stable identities (`grid`), hyperparameter selection on validation
(`selection`), one cell (`cell`), worker processes (`workers`) and the whole sweep with its
tables (`sweep`). Experiments are found by name at run time, never imported.
"""

__all__ = ["cell", "cli", "grid", "selection", "sweep", "workers"]
