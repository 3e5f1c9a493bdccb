"""Invariants of regularised fine-tuning (DELTA, BSS, LwF), WiSE-FT and model soups.

The bitwise resumes, the trained comparisons with `full` and the second BatchNorm mode are in
the slow group (each trains several tiny fits), for the default run's time."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tlresearch import models
from tlresearch.core.errors import UserError
from tlresearch.methods import penalty, strategies
from tlresearch.training import checkpoint, programs, train, weight_space
from tests.conftest import fit_one, tiny_model_cfg, tiny_train_cfg

SOURCE_CLASSES = 6


def _setup():
  model = models.build(tiny_model_cfg(), 4)
  variables = dict(model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3))))
  # Running statistics unlike a batch's, so that train and inference mode differ.
  variables["batch_stats"] = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
  width = variables["params"]["head"]["dense"]["kernel"].shape[0]
  source_head = {"kernel": jax.random.normal(jax.random.key(7), (width, SOURCE_CLASSES)),
                 "bias": jnp.zeros((SOURCE_CLASSES,))}
  return model, variables, source_head


def _no_es(**kw):
  cfg = tiny_train_cfg(**kw)
  cfg.early_stopping.enabled = False
  return cfg


def _first_step_loss(model, variables, spec_text, dataset, cfg):
  """The loss (task + penalty) of the first train step."""
  stage = strategies.get(spec_text, model.groups).stages[0]
  spec, inputs = train.stage_spec(model, stage, variables, cfg, len(dataset.train_x), 2)
  state = programs.init_state(spec, variables, inputs)
  idx = jnp.arange(spec.batch_size)
  key = jax.random.key(0)
  _, (loss, _) = programs.train_step(spec, state, jnp.asarray(dataset.train_x),
                                     jnp.asarray(dataset.train_y), idx, key, key, inputs)
  return float(loss)


def _features(model, variables, x):
  """Penultimate (pooled) features of the backbone in inference mode."""
  fmap = model.apply(variables, programs.preprocess(jnp.asarray(x), model), stop=model.groups[-2])
  return np.asarray(penalty.penultimate(fmap))


# ---------------------------------------------------------------- the strategies as data

@pytest.mark.parametrize("spec, decay, name", [
    ("delta:alpha=0.1,beta=0.01", False, "delta"),
    ("bss:eta=0.001,k=1", True, "bss"),
    ("lwf:lam=1,temperature=2", True, "lwf"),
])
def test_regularised_strategies_train_everything_with_their_penalty(spec, decay, name):
  model, variables, _ = _setup()
  strategy = strategies.get(spec, model.groups)
  (stage,) = strategy.stages
  paths = traverse_util.flatten_dict(variables["params"], sep="/")
  rules = strategies.resolve(stage.rules, paths)
  assert all(r == 1.0 for r in rules.values())  # every parameter trains, at the base lr
  assert stage.weight_decay is decay  # DELTA replaces weight decay; BSS and LwF add to it
  assert stage.penalty[0] == name and strategy.spec == spec


@pytest.mark.parametrize("spec", ["delta:alpha=-1", "bss:k=0", "bss:eta=x",
                                  "lwf:temperature=0", "lwf:lam=-0.5"])
def test_bad_penalty_options_are_one_line_errors(spec):
  with pytest.raises(UserError, match="strategy"):
    strategies.get(spec, ("stem", "stage1", "head"))


# ---------------------------------------------------------------- DELTA

@pytest.mark.parametrize("bn_stats", ["update",
                                      pytest.param("frozen", marks=pytest.mark.slow)])
def test_delta_is_zero_at_the_start(dataset, bn_stats):
  # The frozen starting network runs its BatchNorm in the trained network's mode (batch
  # statistics under "update"), so at the first step the two are one network.
  model, variables, _ = _setup()
  cfg = _no_es(weight_decay=0.0, bn_stats=bn_stats)
  plain = _first_step_loss(model, variables, "full", dataset, cfg)
  delta = _first_step_loss(model, variables, "delta:alpha=10,beta=0", dataset, cfg)
  assert delta == pytest.approx(plain, abs=1e-6)


def test_delta_value_and_gradient_pull_features_toward_the_teacher():
  f = {"stage1": jnp.array([[1.0, 2.0], [0.0, 0.0]])}
  t = {"stage1": jnp.array([[0.0, 2.0], [0.0, 1.0]])}
  head = {"head/dense/kernel": jnp.array([1.0, 2.0]), "head/dense/bias": jnp.array([5.0])}
  pen = ("delta", 0.5, 0.1)
  # alpha/2 * mean over the batch of per-example squared distances + beta/2 ||head kernel||^2
  expected = 0.25 * (1.0 + 1.0) / 2 + 0.05 * 5.0
  assert float(penalty.value(pen, head, {}, "head", f, t)) == pytest.approx(expected)
  g = jax.grad(lambda x: penalty.value(pen, head, {}, "head", {"stage1": x}, t))(f["stage1"])
  step = -np.asarray(g)
  np.testing.assert_allclose(step, -0.5 * (f["stage1"] - t["stage1"]) / 2)  # toward t


@pytest.mark.slow
def test_delta_keeps_the_features_nearer_the_pretrained_ones_than_full(dataset):
  model, variables, _ = _setup()
  # Inference-mode BatchNorm, so that the features compared here are the ones the penalty sees.
  cfg = _no_es(epochs=3, lr=0.2, weight_decay=0.0, bn_stats="frozen")
  before = _features(model, variables, dataset.test_x)
  moved = {}
  for spec in ("full", "delta:alpha=0.05,beta=0"):
    out = fit_one(model, variables, strategies.get(spec, model.groups), dataset, cfg,
                  train.CellKeys.from_seed(0))
    moved[spec] = float(np.mean(np.sum((_features(model, out.variables, dataset.test_x)
                                        - before) ** 2, -1)))
  assert 0 < moved["delta:alpha=0.05,beta=0"] < 0.5 * moved["full"], moved


def test_delta_above_a_cached_frozen_prefix_reads_only_the_groups_it_trains():
  groups = ("stem", "stage1", "stage2", "head")
  assert penalty.captured_groups(("delta", 1.0, 0.0), groups, "stem") == groups[:-1]
  assert penalty.captured_groups(("delta", 1.0, 0.0), groups, "stage2") == ("stage2",)
  assert penalty.captured_groups(("bss", 1.0, 1), groups, "stem") == ("stage2",)
  assert penalty.captured_groups(("l2_sp", 1.0, 1.0), groups, "stem") == ()


# ---------------------------------------------------------------- BSS

@pytest.mark.parametrize("shape, k", [((8, 5), 1), ((8, 5), 2), ((3, 5), 1)])
def test_bss_is_the_k_smallest_squared_singular_values(shape, k):
  f = jax.random.normal(jax.random.key(shape[0] + k), shape)
  sigma = np.linalg.svd(np.asarray(f, np.float64), compute_uv=False)  # descending
  expected = 0.3 * np.sum(np.sort(sigma)[:k] ** 2)
  got = penalty.value(("bss", 0.3, k), {}, {}, "head", {"stage3": f})
  assert float(got) == pytest.approx(expected, rel=1e-4)


def test_bss_shrinks_the_smallest_singular_direction():
  f = jnp.array([[3.0, 0.0], [0.0, 0.5], [1.0, 0.2]])
  g = jax.grad(lambda x: penalty.value(("bss", 1.0, 1), {}, {}, "head", {"s": x}))(f)
  f2 = f - 0.1 * g
  smallest = lambda a: np.linalg.svd(np.asarray(a), compute_uv=False)[-1]  # noqa: E731
  largest = lambda a: np.linalg.svd(np.asarray(a), compute_uv=False)[0]  # noqa: E731
  assert smallest(f2) < smallest(f)
  assert largest(f2) == pytest.approx(largest(f), rel=1e-3)  # the top direction is left alone


@pytest.mark.slow
def test_bss_with_eta_zero_trains_as_full(dataset):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=2)
  a = fit_one(model, variables, strategies.get("full", model.groups), dataset, cfg,
              train.CellKeys.from_seed(0))
  b = fit_one(model, variables, strategies.get("bss:eta=0,k=1", model.groups), dataset, cfg,
              train.CellKeys.from_seed(0))
  assert a.test == pytest.approx(b.test, abs=1e-5)


# ---------------------------------------------------------------- LwF

@pytest.mark.parametrize("bn_stats", ["update",
                                      pytest.param("frozen", marks=pytest.mark.slow)])
def test_lwf_is_zero_while_the_network_predicts_the_source_task_as_before(dataset, bn_stats):
  model, variables, source_head = _setup()
  variables = {**variables, penalty.SOURCE_HEAD: source_head}
  cfg = _no_es(weight_decay=0.0, bn_stats=bn_stats)
  plain = _first_step_loss(model, variables, "full", dataset, cfg)
  lwf = _first_step_loss(model, variables, "lwf:lam=5,temperature=2", dataset, cfg)
  assert lwf == pytest.approx(plain, abs=1e-6)


def test_lwf_value_is_the_kl_of_softened_source_predictions():
  head = {"kernel": jnp.array([[1.0, -1.0, 0.0], [0.5, 0.0, 2.0]]), "bias": jnp.zeros(3)}
  f = {"stage3": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
  t = {"stage3": jnp.array([[0.0, 1.0], [1.0, 1.0]])}
  temperature, lam = 2.0, 0.7
  soft = lambda z: np.exp(z / temperature) / np.exp(z / temperature).sum(-1, keepdims=True)  # noqa
  kernel = np.asarray(head["kernel"])
  p, q = soft(np.asarray(t["stage3"]) @ kernel), soft(np.asarray(f["stage3"]) @ kernel)
  expected = lam * np.mean(np.sum(p * np.log(p / q), -1))
  got = penalty.value(("lwf", lam, temperature), {}, {penalty.SOURCE_HEAD: head}, "head", f, t)
  assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_lwf_keeps_the_source_predictions_nearer_than_full(dataset):
  model, variables, source_head = _setup()
  cfg = _no_es(epochs=3, lr=0.2, bn_stats="frozen")
  logits = lambda v: _features(model, v, dataset.test_x) @ np.asarray(source_head["kernel"])  # noqa
  before = np.argmax(logits(variables), -1)
  agree = {}
  for spec in ("full", "lwf:lam=20,temperature=2"):
    start = {**variables, penalty.SOURCE_HEAD: source_head}
    out = fit_one(model, start, strategies.get(spec, model.groups), dataset, cfg,
                  train.CellKeys.from_seed(0))
    assert set(out.variables) == {"params", "batch_stats"}  # the source head is read-only
    agree[spec] = float(np.mean(np.argmax(logits(out.variables), -1) == before))
  assert agree["lwf:lam=20,temperature=2"] > agree["full"], agree


def test_lwf_without_a_source_head_is_an_error():
  model, variables, _ = _setup()
  stage = strategies.get("lwf", model.groups).stages[0]
  with pytest.raises(ValueError, match="source head"):
    penalty.anchor(stage, variables, {})


# ---------------------------------------------------------------- WiSE-FT

def test_wise_ft_curve_ends_are_the_probe_and_lp_ft_and_alpha_is_chosen_on_validation(dataset):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=3)
  keys = train.CellKeys.from_seed(0)
  lp_ft = fit_one(model, variables, strategies.get("lp_ft:probe=0.5", model.groups), dataset,
                  cfg, keys)
  wise = fit_one(model, variables, strategies.get("wise_ft:probe=0.5", model.groups), dataset,
                 cfg, keys)
  curve = wise.weight_space
  assert curve["alphas"] == list(weight_space.ALPHAS)
  # a = 1 is LP-FT's fine-tuned model, a = 0 the probe it started from.
  assert curve["test_accuracy"][-1] == pytest.approx(lp_ft.test["accuracy"], abs=1e-6)
  assert curve["val_accuracy"][0] == pytest.approx(lp_ft.history[0]["val_accuracy"], abs=1e-6)
  i = curve["alphas"].index(curve["alpha"])
  assert curve["val_accuracy"][i] == max(curve["val_accuracy"])
  # The reported result is the chosen point's.
  assert wise.test["accuracy"] == pytest.approx(curve["test_accuracy"][i], abs=1e-6)
  assert wise.val["accuracy"] == pytest.approx(curve["val_accuracy"][i], abs=1e-6)


def test_wise_ft_choice_breaks_ties_by_loss_then_larger_alpha():
  acc = [0.5, 0.8, 0.8, 0.8] + [0.1] * 7
  loss = [1.0, 0.4, 0.3, 0.3] + [2.0] * 7
  assert weight_space.ALPHAS[weight_space.choose(acc, loss)] == 0.3


@pytest.mark.slow
def test_interrupted_wise_ft_and_delta_resume_to_the_same_result(dataset, tmp_path):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=4)
  keys = train.CellKeys.from_seed(0)

  class Killed(Exception):
    pass

  def kill(record, _):
    if record["epoch"] == 3:
      raise Killed

  for spec in ("wise_ft:probe=0.5", "delta:alpha=0.1,beta=0.01"):
    strategy = strategies.get(spec, model.groups)
    whole = fit_one(model, variables, strategy, dataset, cfg, keys)
    folder = str(tmp_path / spec.split(":")[0])
    ckpt = lambda: checkpoint.FitCheckpointer(folder, "fp", min_seconds=0)  # noqa: E731
    with pytest.raises(Killed):
      fit_one(model, variables, strategy, dataset, cfg, keys, checkpointer=ckpt(), on_epoch=kill)
    resumed = fit_one(model, variables, strategy, dataset, cfg, keys, checkpointer=ckpt())
    assert resumed.test == whole.test and resumed.weight_space == whole.weight_space, spec
    np.testing.assert_array_equal(resumed.test_predictions, whole.test_predictions)


# ---------------------------------------------------------------- model soups

def test_soup_strategy_spreads_the_lr_and_checks_its_options():
  groups = ("stem", "stage1", "head")
  s = strategies.get("soup:n=3,spread=4", groups)
  assert s.weight_space[0] == "soup" and s.weight_space[2] == "recompute"
  np.testing.assert_allclose(s.weight_space[1], [0.25, 1.0, 4.0])
  for bad in ("soup:n=1", "soup:spread=0.5", "soup:bn=median"):
    with pytest.raises(UserError, match="strategy 'soup'"):
      strategies.get(bad, groups)


def test_recomputed_batch_statistics_are_the_training_split_statistics():
  # 300 images: two chunks. The first BatchNorm's input does not depend on any
  # normalisation, so its pooled statistics must equal those of all images at once.
  from tests.conftest import make_dataset
  ds = make_dataset(n_train=300)
  model, variables, _ = _setup()
  out = weight_space.recompute_batch_stats(model, variables, ds.train_x)
  x = programs.preprocess(jnp.asarray(ds.train_x), model)
  _, inter = model.apply(variables, x, stop="stem", capture_intermediates=lambda m, _: (
      m.scope.path == ("stem", "conv")), mutable=["intermediates"])
  conv = np.asarray(inter["intermediates"]["stem"]["conv"]["__call__"][0], np.float64)
  stats = out["batch_stats"]["stem"]["bn"]
  np.testing.assert_allclose(stats["mean"], conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["var"], conv.var((0, 1, 2)), rtol=1e-3, atol=1e-5)
  assert jax.tree.structure(out) == jax.tree.structure(variables)


def test_a_soup_of_identical_ingredients_is_the_ingredient(dataset):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=2)
  keys = train.CellKeys.from_seed(0)
  full = fit_one(model, variables, strategies.get("full", model.groups), dataset, cfg, keys)
  soup = fit_one(model, variables, strategies.get("soup:n=2,spread=1,bn=average", model.groups),
                 dataset, cfg, keys)
  assert soup.test == pytest.approx(full.test, abs=1e-6)
  record = soup.weight_space
  assert [i["lr"] for i in record["ingredients"]] == [cfg.lr, cfg.lr]
  assert record["greedy"]["lrs"] == [cfg.lr, cfg.lr]  # an equal soup never lowers validation
  assert len(soup.history) == 2 * len(full.history)


def test_greedy_soup_is_no_worse_on_validation_than_its_best_ingredient(dataset):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=2)
  soup = fit_one(model, variables, strategies.get("soup:n=3,spread=3", model.groups), dataset,
                 cfg, train.CellKeys.from_seed(0))
  record = soup.weight_space
  lrs = [i["lr"] for i in record["ingredients"]]
  np.testing.assert_allclose(lrs, [cfg.lr / 3, cfg.lr, cfg.lr * 3])
  best = max(record["ingredients"], key=lambda i: i["val_accuracy"])
  assert record["greedy"]["lrs"][0] == best["lr"]  # the greedy soup starts from the best one
  assert soup.val["accuracy"] == record["greedy"]["val_accuracy"]
  assert soup.test["accuracy"] == record["greedy"]["test_accuracy"]
  assert 0 <= record["uniform"]["test_accuracy"] <= 1


@pytest.mark.slow
def test_interrupted_soup_resumes_to_the_same_result(dataset, tmp_path):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=2)
  keys = train.CellKeys.from_seed(0)
  strategy = strategies.get("soup:n=2,spread=3", model.groups)

  class Killed(Exception):
    pass

  def kill(record, _):
    if record["ingredient"] == 1 and record["epoch"] == 1:
      raise Killed

  whole = fit_one(model, variables, strategy, dataset, cfg, keys)
  ckpt = lambda: checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp", min_seconds=0)  # noqa
  with pytest.raises(Killed):
    fit_one(model, variables, strategy, dataset, cfg, keys, checkpointer=ckpt(), on_epoch=kill)
  resumed = fit_one(model, variables, strategy, dataset, cfg, keys, checkpointer=ckpt())
  assert resumed.test == whole.test and resumed.weight_space == whole.weight_space


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["lwf:lam=0,temperature=2", "delta:alpha=0,beta=0"])
def test_a_zero_strength_penalty_trains_as_its_base(dataset, spec):
  # The extra forward pass of the frozen starting network changes nothing but the penalty.
  model, variables, source_head = _setup()
  cfg = _no_es(epochs=2, weight_decay=0.0)
  keys = train.CellKeys.from_seed(0)
  start = {**variables, penalty.SOURCE_HEAD: source_head}
  a = fit_one(model, variables, strategies.get("full", model.groups), dataset, cfg, keys)
  b = fit_one(model, start, strategies.get(spec, model.groups), dataset, cfg, keys)
  assert a.test == pytest.approx(b.test, abs=1e-5)
  np.testing.assert_array_equal(a.test_predictions, b.test_predictions)


def test_wise_ft_with_recomputed_statistics_picks_its_best_validation_point(dataset):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=3)
  wise = fit_one(model, variables,
                 strategies.get("wise_ft:probe=0.5,bn=recompute", model.groups), dataset, cfg,
                 train.CellKeys.from_seed(0))
  curve = wise.weight_space
  assert curve["bn"] == "recompute" and len(curve["val_accuracy"]) == len(weight_space.ALPHAS)
  i = curve["alphas"].index(curve["alpha"])
  assert curve["val_accuracy"][i] == max(curve["val_accuracy"])
  assert wise.test["accuracy"] == pytest.approx(curve["test_accuracy"][i], abs=1e-6)
  with pytest.raises(UserError, match="bn must be one of"):
    strategies.get("wise_ft:bn=median", model.groups)


# ---------------------------------------------------------------- DELTA's channel attention

def test_channel_weights_follow_the_loss_increase_and_sum_to_one():
  from tlresearch.training import attention
  w = attention.channel_weights([1.0, 1.5, 3.0, 1.0], base=1.0)
  assert w.sum() == pytest.approx(1.0, abs=1e-6)
  assert np.argmax(w) == 2 and w[0] == pytest.approx(w[3]) and w[1] > w[0]
  np.testing.assert_allclose(attention.channel_weights([2.0] * 4, 1.0), 0.25)


def test_zeroed_channel_losses_match_a_direct_computation(dataset):
  import optax
  from tlresearch.training import attention
  model, variables, _ = _setup()
  x = programs.prefix_outputs(model, variables, jnp.asarray(dataset.train_x), "stage1")
  y = jnp.asarray(dataset.train_y)
  losses, base = attention._zeroed_losses(model, "stage2", variables, x, y)
  for j in (0, x.shape[-1] - 1):
    h = x.at[..., j].set(0.0)
    logits = model.apply(variables, h, start="stage2")
    direct = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    assert float(losses[j]) == pytest.approx(float(direct), rel=1e-5)
  logits = model.apply(variables, x, start="stage2")
  assert float(base) == pytest.approx(
      float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()), rel=1e-5)


def test_delta_attention_weighs_each_channel_of_the_distance():
  f = {"stage1": jnp.array([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])}  # [batch 2, 1, 1, 2 channels]
  t = {"stage1": jnp.zeros((2, 1, 1, 2))}
  anchor = {"attention": {"stage1": jnp.array([0.75, 0.25])}}
  pen = ("delta", 2.0, 0.0, "attention")
  expected = 0.5 * 2.0 * (0.75 * 1.0 + 0.25 * 4.0) / 2
  assert float(penalty.value(pen, {}, anchor, "head", f, t)) == pytest.approx(expected)
  with pytest.raises(ValueError, match="attention"):  # asked for, but never computed
    penalty.value(pen, {}, {}, "head", f, t)


@pytest.mark.slow
def test_delta_with_attention_trains_and_resumes_bitwise(dataset, tmp_path):
  model, variables, _ = _setup()
  cfg = _no_es(epochs=3, weight_decay=0.0)
  keys = train.CellKeys.from_seed(0)
  strategy = strategies.get("delta:alpha=0.1,beta=0.01,attention=1", model.groups)
  assert strategy.stages[0].penalty[3:] == ("attention",)
  whole = fit_one(model, variables, strategy, dataset, cfg, keys)

  class Killed(Exception):
    pass

  def kill(record, _):
    if record["epoch"] == 2:
      raise Killed

  ckpt = lambda: checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp", min_seconds=0)  # noqa
  with pytest.raises(Killed):
    fit_one(model, variables, strategy, dataset, cfg, keys, checkpointer=ckpt(), on_epoch=kill)
  resumed = fit_one(model, variables, strategy, dataset, cfg, keys, checkpointer=ckpt())
  assert resumed.test == whole.test
  with pytest.raises(UserError, match="attention must be 0 or 1"):
    strategies.get("delta:attention=2", model.groups)
