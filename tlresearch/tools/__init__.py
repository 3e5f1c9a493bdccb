"""Command-line tools beside the main command, each `python -m tlresearch.tools.NAME`:
`bench` (speed numbers), `floor` (a finished sweep"s compute floor), `device_check` (GPU
checks), `probe_check` (the probe rows against scikit-learn), `to_folder` (a dataset written
as an image folder).
"""

__all__ = ["bench", "device_check", "floor", "probe_check", "rates", "to_folder"]
