"""From finished cells to claims: intervals and tests (`stats`), `runs.csv`, tables and plots
(`report`), computed verdicts (`findings`), transferability estimators
(`transferability`) and the extra measurements a cell can record (`probes`).
"""

__all__ = ["findings", "probes", "report", "stats", "transferability"]
