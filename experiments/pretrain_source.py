"""Pretrain the default backbone on the source glyph task and cache its checkpoint.

`finetune_sweep` builds the same checkpoint on demand; run this to build it ahead of time or
to see the source accuracy. The cache key is the whole pretraining config.
"""
import ml_collections

from tlresearch.core import schema


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep()
  c.kind = "pretrain"          # what tlresearch.run does with this config: only c.pretrain
  return c
