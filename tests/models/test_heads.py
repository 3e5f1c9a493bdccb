"""Heads as config (`model.head`): shapes, groups and strategies for every backbone family,
dropout placement, and the checks."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tlresearch.core import schema
from tlresearch import models
from tlresearch.core.errors import UserError
from tlresearch.experiment import cell
from tlresearch.methods import strategies
from tlresearch.models.heads import Head
from tlresearch.training import train
from tests.conftest import tiny_model_cfg

MLP = {"pooling": "flatten", "hidden": [12, 6], "activation": "relu"}
FAMILIES = [  # config, input size, shape of the last group's feature map
    (lambda: tiny_model_cfg(), 16, (2, 2, 16)),
    (lambda: schema.keras_model(family="vgg16", width=4, input_size=32), 32, (1, 1, 32)),
    (lambda: schema.keras_model(family="resnet50", width=4, input_size=32), 32, (1, 1, 128)),
    (lambda: schema.keras_model(family="mobilenet_v2", alpha=0.1, input_size=32), 32,
     (1, 1, 1280)),
]


@pytest.mark.parametrize("make, size, fmap", FAMILIES, ids=["resnet", "vgg16", "resnet50",
                                                             "mobilenet_v2"])
def test_mlp_head_is_one_group_with_flatten_hidden_layers_and_classifier(make, size, fmap):
  cfg = make()
  cfg.head = ml_collections.ConfigDict(MLP)
  model = models.build(cfg, 5)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  head = shapes["params"]["head"]
  assert model.groups[-1] == "head" and set(head) == {"hidden1", "hidden2", "dense"}
  assert head["hidden1"]["kernel"].shape == (int(np.prod(fmap)), 12)
  assert head["hidden2"]["kernel"].shape == (12, 6)
  assert head["dense"]["kernel"].shape == (6, 5)
  # A strategy speaks of the head as one group: the probe trains exactly the three layers.
  paths = models.param_paths(cfg)
  rules = strategies.resolve(strategies.get("linear_probe", model.groups).stages[0].rules, paths)
  assert {p for p, r in rules.items() if r != strategies.FROZEN} == {
      f"head/{layer}/{w}" for layer in ("hidden1", "hidden2", "dense") for w in ("kernel", "bias")}
  out = jax.eval_shape(model.apply, shapes, jnp.zeros((2, size, size, 3)))
  assert out.shape == (2, 5)


def test_default_head_is_the_linear_head_and_leaves_identities_alone():
  assert {p.split("/")[1] for p in models.param_paths(tiny_model_cfg())
          if p.startswith("head/")} == {"dense"}
  full = schema.sweep()
  old = full.to_dict()
  del old["model"]["head"], old["pretrain"]["model"]["head"]  # a config from before the key
  assert cell.identity(old) == cell.identity(full)
  full.model.head.hidden = [8]
  assert cell.identity(old) != cell.identity(full)
  assert cell.identity(old)["pretrain"] == cell.identity(full)["pretrain"]  # source unchanged


def test_dropout_acts_after_each_hidden_layer_and_on_the_classifier_input():
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 8))
  for hidden, dropouts in (((), ["Dropout_0"]), ((6,), ["Dropout_0"]),
                           ((6, 5), ["Dropout_0", "Dropout_1"])):
    head = Head(3, 0.5, "flatten", hidden=hidden)
    v = head.init(jax.random.key(1), x)
    _, inter = head.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)},
                          capture_intermediates=True)
    names = sorted(inter["intermediates"])
    assert [n for n in names if n.startswith("Dropout")] == dropouts
    # The classifier's input is the last dropout's output: half its units are zeroed.
    last = inter["intermediates"][dropouts[-1]]["__call__"][0]
    assert last.shape[-1] == (hidden[-1] if hidden else 32)
    assert 0.2 < float(jnp.mean(last == 0)) < 0.8
    np.testing.assert_array_equal(head.apply(v, x), head.apply(v, x))  # off when evaluating


def test_mlp_head_is_trained_not_solved_as_a_probe():
  cfg = tiny_model_cfg()
  linear = models.build(cfg, 3)
  cfg.head = ml_collections.ConfigDict(MLP)
  mlp = models.build(cfg, 3)
  stage = strategies.get("linear_probe", linear.groups).stages[0]
  paths = models.param_paths(tiny_model_cfg())
  assert train.solves_probe(linear, stage, paths, schema.train())
  assert not train.solves_probe(mlp, stage, models.param_paths(cfg), schema.train())


@pytest.mark.parametrize("head, message", [
    ({"pooling": "mean"}, "model.head.pooling must be one of avg, flatten, max, got 'mean'"),
    ({"hidden": [0]}, "model.head.hidden must be a list of layer widths >= 1"),
    ({"hidden": 256}, "model.head.hidden must be a list of layer widths >= 1"),
    ({"activation": "elu"}, "model.head.activation must be one of"),
    ({"depth": 2}, "model.head.depth is not a head field"),
])
def test_bad_head_values_are_one_line_errors(head, message):
  cfg = tiny_model_cfg()
  cfg.head = ml_collections.ConfigDict(head)
  with pytest.raises(UserError, match=message):
    models.build(cfg, 3)


def test_keras_own_top_and_a_pretrained_head_need_the_default_head():
  cfg = schema.keras_model(width=4, input_size=32, top="keras")
  cfg.head.hidden = [8]
  with pytest.raises(UserError, match="model.head applies to model.top='linear' only"):
    models.build(cfg, 3)
  c = schema.sweep(pretrained_head=True)
  c.model.head.hidden = [8]
  with pytest.raises(UserError, match="pretrained_head=True loads the source's linear head"):
    cell.check(c)


def test_a_config_can_switch_family_keeping_other_families_defaults():
  cfg = schema.keras_model(family="vgg16")
  cfg.family, cfg.pretrained, cfg.width, cfg.input_size = "resnet", "", 4, 32
  models.build(cfg, 3)  # top="linear" and alpha=1.0 (Keras defaults) are ignored
  cfg.top = "keras"
  with pytest.raises(UserError, match="model.top is not a field of model.family 'resnet'"):
    models.build(cfg, 3)
