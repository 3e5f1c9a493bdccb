"""The blocks experiments build their configs from: the library's config schema
(tlresearch.core.schema), which holds the one copy of every default."""
from tlresearch.core.schema import (checkpoint, data, head, keras_model, model, pretrain, report,
                                    selection, sweep, train)

__all__ = ["checkpoint", "data", "head", "keras_model", "model", "pretrain", "report",
           "selection", "sweep", "train"]
