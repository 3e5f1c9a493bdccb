"""Class halves for the layer-transfer experiment, and the pretraining cache key."""
import numpy as np

from tlresearch.core import schema
from tlresearch.data.loader import _subset, class_half
from tlresearch.training import pretrain
from tests.conftest import make_dataset


def test_halves_partition_the_classes_deterministically():
  a, b = class_half(36, "A"), class_half(36, "B")
  assert len(a) == len(b) == 18 and not set(a) & set(b) and set(a) | set(b) == set(range(36))
  assert np.array_equal(a, class_half(36, "A"))
  assert not np.array_equal(a, np.arange(18))  # a random split, not the first 18 labels


def test_subset_keeps_only_its_classes_relabelled():
  ds = make_dataset(n_train=80, n_val=40, n_test=40, classes=8)
  half = _subset(ds, "B")
  keep = class_half(8, "B")
  assert half.num_classes == 4 and half.class_names == tuple(ds.class_names[i] for i in keep)
  for x, y, xs, ys in ((ds.train_x, ds.train_y, half.train_x, half.train_y),
                       (ds.test_x, ds.test_y, half.test_x, half.test_y)):
    orig = np.flatnonzero(np.isin(y, keep))
    assert np.array_equal(xs, x[orig])
    assert np.array_equal(keep[ys], y[orig])  # label i is the i-th kept class


def test_pretrain_cache_key_includes_the_class_subset_but_not_operational_keys():
  p = schema.pretrain()
  operational = schema.pretrain()
  operational.train.seeds_mode, operational.train.data_parallel = "vmap", False
  operational.train.new_switch = True  # a key added later, never listed: the key stays
  assert pretrain.cache_key(p) == pretrain.cache_key(operational)
  keys = set()
  for subset in ("", "A", "B"):
    p.class_subset = subset
    keys.add(pretrain.cache_key(p))
  assert len(keys) == 3
