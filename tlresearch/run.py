"""The main command: `python -m tlresearch.run --experiment=NAME [--config.KEY=VALUE ...]`.

Only an entry point: flags, configs and the sweep live in `tlresearch.experiment`
(`python -m tlresearch.run --help` lists the flags).
"""
from tlresearch.experiment.cli import cli

if __name__ == "__main__":
  cli()
