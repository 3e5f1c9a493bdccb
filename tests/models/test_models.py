import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlresearch import models
from tlresearch.analysis import stats
from tests.conftest import tiny_model_cfg


def _vars(classes, **kw):
  model = models.build(tiny_model_cfg(**kw), classes)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_merge_keeps_pretrained_backbone_and_fresh_head():
  _, pre = _vars(36)
  _, fresh = _vars(10)
  fresh = jax.tree.map(lambda a: a + 1.0, fresh)
  merged = models.merge_pretrained(fresh, pre)
  np.testing.assert_array_equal(merged["params"]["stem"]["conv"]["kernel"],
                                pre["params"]["stem"]["conv"]["kernel"])
  np.testing.assert_array_equal(merged["batch_stats"]["stage1"]["block1"]["bn1"]["mean"],
                                pre["batch_stats"]["stage1"]["block1"]["bn1"]["mean"])
  assert merged["params"]["head"]["dense"]["kernel"].shape == (16, 10)
  np.testing.assert_array_equal(merged["params"]["head"]["dense"]["kernel"],
                                fresh["params"]["head"]["dense"]["kernel"])


def test_merge_names_missing_unexpected_and_mismatched_parameters():
  _, pre = _vars(10, num_stages=2)
  _, fresh = _vars(10)
  with pytest.raises(ValueError, match="missing in checkpoint: .*params/stage3/block1/conv1/kernel"):
    models.merge_pretrained(fresh, pre)
  with pytest.raises(ValueError, match="unexpected in checkpoint: .*params/stage3"):
    models.merge_pretrained(pre, fresh)
  _, wide = _vars(10, width=8)
  with pytest.raises(ValueError, match=r"shape mismatch: .*params/stem/conv/kernel: pretrained \(3, 3, 3, 8\) vs model \(3, 3, 3, 4\)"):
    models.merge_pretrained(fresh, wide)


def test_model_runs_any_slice_of_groups():
  model, v = _vars(10)
  x = jnp.ones((2, 16, 16, 3))
  whole = model.apply(v, x)
  mid = model.apply(v, x, stop="stage1")
  rest = model.apply(v, mid, start="stage2")
  np.testing.assert_allclose(whole, rest, rtol=1e-5, atol=1e-5)


def test_mean_ci_is_a_t_interval():
  mean, half = stats.mean_ci([1.0, 2.0, 3.0])
  assert mean == 2.0
  assert half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
  assert np.isnan(stats.mean_ci([0.5])[1])
  d, h = stats.paired_difference([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
  assert d == pytest.approx(0.1) and h == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(3, 3, 3, 16), (1, 1, 16, 32), (3, 3, 1, 24), (7, 7, 3, 8),
                                   (40, 10)])
def test_the_conv_kernel_init_is_bitwise_flax_lecun_normal(shape):
  # layers.lecun_normal draws a 4-D kernel as a 2-D array (it compiles faster): the same
  # numbers as flax's default init, which draws it in 4-D; depthwise (3, 3, 1, C) included.
  from flax import linen as nn
  from tlresearch.models import layers
  key = jax.random.key(11)
  np.testing.assert_array_equal(layers.lecun_normal(key, shape),
                                nn.initializers.lecun_normal()(key, shape))


def test_compiled_init_is_bitwise_the_eager_init():
  from tlresearch.training import programs
  model = models.build(tiny_model_cfg(dropout_rate=0.5), 7)
  key = jax.random.fold_in(jax.random.key(3), 0)
  eager = model.init(key, jnp.zeros((1, 16, 16, 3), jnp.float32))
  compiled = programs.init_variables(model, key, (16, 16, 3))
  assert jax.tree.structure(eager) == jax.tree.structure(compiled)
  assert tuple(compiled["params"]) == tuple(eager["params"]) == model.groups
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
    np.testing.assert_array_equal(a, b)
