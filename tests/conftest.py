"""Shared fixtures: tiny models and random data, so the suite stays fast and offline."""
import os

# Quiet TensorFlow's C++ logging where a test reads a TFRecord dataset.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Keras runs on JAX, as tlresearch imports it (models/keras_import.py): no TensorFlow needed.
os.environ.setdefault("KERAS_BACKEND", "jax")

import ml_collections
import pytest

from tlresearch.core import layout, schema
from tlresearch.data import synthetic

# The tests train in the default execution layout (one thread per process), as the command's
# own process and its workers do: a result in this process is bitwise a worker's. Under
# pytest-xdist each test process holds a core of its own.
layout.pin(schema.sweep().threads, slot=int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]))


def make_dataset(n_train=48, n_val=16, n_test=16, classes=4, seed=0, size=16):
  """Learnable random data: each class has its own mean image plus noise."""
  return synthetic.class_means(n_train, n_val, n_test, classes, seed, size)


@pytest.fixture
def dataset():
  return make_dataset()


def tiny_model_cfg(**kw) -> ml_collections.ConfigDict:
  return schema.model(**{"width": 4, **kw})


def tiny_train_cfg(**kw) -> ml_collections.ConfigDict:
  t = schema.train(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.0)
  t.update(kw)
  return t


def fit_one(model, variables, strategy, data, cfg, keys, checkpointer=None, on_epoch=None):
  """`train.fit` for one seed: its FitResult. `on_epoch(record, state)`."""
  from tlresearch.training import train
  return train.fit(model, [variables], strategy, [data], cfg, [keys],
                   checkpointer=None if checkpointer is None else (lambda _: checkpointer),
                   on_epoch=None if on_epoch is None else (lambda _, r, s: on_epoch(r, s)))[0]
