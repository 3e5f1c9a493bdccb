"""The ground floor: one-line user errors, atomic files, timing phases, config paths and
result identities, and the config schema (`schema`: the one copy of every default).

Imports nothing else of tlresearch.
"""

__all__ = ["configs", "errors", "io", "schema", "timing"]
