"""Tests of byol.networks: norms, weight standardization, ResNets, MLP heads.

Networks are tiny (width 1/8, 16 px, batch <= 8); full-size ResNets are only
traced for shapes (`jax.eval_shape`), never run.
"""

import zlib

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import layers
from byol import networks

KINDS = ('bn', 'gn', 'ln', 'affine', 'none')


def _tiny(norm='gn', ws=False, **kwargs):
  """A one-block-per-group basic ResNet, 8..64 channels, for 16 px inputs."""
  kwargs.setdefault('num_groups', 4)
  return networks.ResNet((1, 1, 1, 1), bottleneck=False, norm=norm,
                         weight_standardization=ws, width_multiplier=0.125,
                         stem='small', **kwargs)


def _images(seed, batch=4, size=16):
  return _normal(seed, (batch, size, size, 3))


def _normal(seed, shape):
  # NumPy, not jax.random: each eager jax.random call compiles for seconds.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _shapes(fn, *inputs):
  """Parameter and state shapes of `fn(*inputs)`, without computing."""
  return jax.eval_shape(hk.transform_with_state(fn).init,
                        jax.random.PRNGKey(0), *inputs)


def _numpy_weights(next_creator, shape, dtype, init, context):
  """Draws conv/linear weights in NumPy (fan-in scaled normal).

  Compiling JAX's RNG for each weight of even a tiny ResNet's init costs
  XLA's CPU backend ~15 s; constants cost nothing. Norm and bias parameters
  keep their real initializers.
  """
  if context.name == 'w':
    rng = np.random.default_rng(zlib.crc32(context.full_name.encode()))
    value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    init = lambda shape, dtype: jnp.asarray(value, dtype)
  return next_creator(shape, dtype, init)


def _transform(forward):
  """`hk.transform_with_state` with NumPy-drawn weights at init."""
  def wrapped(*args):
    with hk.custom_creator(_numpy_weights):
      return forward(*args)
  return hk.transform_with_state(wrapped)


def _init(transformed, *inputs):
  """Jitted init: one compilation instead of one per primitive."""
  return jax.jit(transformed.init)(jax.random.PRNGKey(0), *inputs)


def _fill(transformed, *inputs):
  """Parameters and state from a shape-only init, filled in NumPy.

  Weights `w` are fan-in scaled normals, `scale` ones, everything else
  (offsets, biases, BatchNorm's moving averages and counters) zeros, as the
  real initializers give; but nothing is compiled. For tests of what a
  network computes, not of how it is initialised.
  """
  def fill(path, leaf):
    name = path[-1].key
    if name == 'w':
      rng = np.random.default_rng(zlib.crc32(jax.tree_util.keystr(path)
                                             .encode()))
      return jnp.asarray(rng.standard_normal(leaf.shape)
                         / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
    return (jnp.ones if name == 'scale' else jnp.zeros)(leaf.shape, leaf.dtype)
  shapes = jax.eval_shape(transformed.init, jax.random.PRNGKey(0), *inputs)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _num_params(params):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _randomize(params, seed, keys=('scale', 'offset')):
  """Replaces the named leaves with random values so the test is not trivial."""
  def replace(path, leaf):
    if path[-1].key not in keys:
      return leaf
    sub_seed = seed + zlib.crc32(jax.tree_util.keystr(path).encode())
    return leaf + 0.3 * _normal(sub_seed, leaf.shape)
  return jax.tree_util.tree_map_with_path(replace, params)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _apply_pair(fast, reference, x):
  """Applies two norm modules named alike with the same random params."""
  fast_t = hk.without_apply_rng(hk.transform(lambda x: fast()(x, True)))
  ref_t = hk.without_apply_rng(hk.transform(lambda x: reference()(x)))
  params = _randomize(_init(fast_t, x.astype(jnp.float32)), seed=1)
  return jax.jit(fast_t.apply), jax.jit(ref_t.apply), params


def test_group_norm_matches_haiku_forward_and_grads():
  x = 2. * _normal(0, (3, 5, 6, 32)) + 1.
  fast, ref, params = _apply_pair(
      lambda: layers.GroupNorm(16, name='gn'),
      lambda: hk.GroupNorm(16, eps=1e-5, name='gn'), x)
  np.testing.assert_allclose(fast(params, x),
                             ref(params, x), rtol=1e-5, atol=1e-5)

  weights = _normal(2, x.shape)
  def loss(apply):
    return lambda p, x: jnp.sum(jnp.sin(apply(p, x)) * weights)
  fast_g = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x)
  ref_g = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
  for f, r in zip(jax.tree.leaves(fast_g), jax.tree.leaves(ref_g)):
    assert _rel_err(f, r) < 1e-5


def test_group_norm_bfloat16_input():
  x = 2. * _normal(0, (2, 4, 4, 16)) + 1.
  x16 = x.astype(jnp.bfloat16)
  fast, ref, params = _apply_pair(
      lambda: layers.GroupNorm(4, name='gn'),
      lambda: hk.GroupNorm(4, eps=1e-5, name='gn'), x)
  out = fast(params, x16)
  assert out.dtype == jnp.bfloat16
  # bf16 keeps 8 significant bits: outputs of size ~2 are off by <= 2^-7.
  expected = ref(params, x16.astype(jnp.float32))
  np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=2e-2)
  grad_x16 = jax.grad(lambda x: jnp.sum(fast(params, x)[..., 0]
                                        .astype(jnp.float32)))(x16)
  grad_ref = jax.grad(lambda x: jnp.sum(ref(params, x)[..., 0]))(
      x16.astype(jnp.float32))
  assert grad_x16.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad_x16.astype(jnp.float32), grad_ref,
                             atol=3e-2)


def test_group_norm_on_features_matches_haiku():
  x = _normal(3, (5, 24))
  fast, ref, params = _apply_pair(
      lambda: layers.GroupNorm(6, name='gn'),
      lambda: hk.GroupNorm(6, eps=1e-5, name='gn'), x)
  np.testing.assert_allclose(fast(params, x),
                             ref(params, x), rtol=1e-5, atol=1e-5)


def test_one_group_is_layer_norm():
  x = 3. * _normal(0, (2, 5, 5, 12)) - 1.
  fast, ref, params = _apply_pair(
      lambda: layers.GroupNorm(1, name='n'),
      lambda: hk.LayerNorm(axis=(1, 2, 3), create_scale=True,
                           create_offset=True, eps=1e-5, name='n'), x)
  np.testing.assert_allclose(fast(params, x),
                             ref(params, x), rtol=1e-5, atol=1e-5)
  ln = hk.without_apply_rng(hk.transform(
      lambda x: layers.make_norm('ln')('n')(x, True)))
  np.testing.assert_allclose(ln.apply(params, x), ref(params, x),
                             rtol=1e-5, atol=1e-5)


def test_channel_groups_is_instance_norm():
  x = _normal(0, (2, 4, 3, 6)) * 2. + 0.5
  t = hk.without_apply_rng(hk.transform(
      lambda x: layers.GroupNorm(6)(x)))
  out = t.apply(_init(t, x), x)
  xn = np.asarray(x, np.float64)
  mean = xn.mean(axis=(1, 2), keepdims=True)
  var = xn.var(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(out, (xn - mean) / np.sqrt(var + 1e-5),
                             rtol=1e-5, atol=1e-5)


def test_affine_and_none():
  x = _normal(0, (2, 3, 3, 4))
  t = hk.without_apply_rng(hk.transform(
      lambda x: layers.make_norm('affine')('affine')(x, True)))
  params = _init(t, x)
  assert jax.tree.map(jnp.shape, params) == {
      'affine': {'scale': (4,), 'offset': (4,)}}
  params = {'affine': {'scale': jnp.array([1., 2., 3., 4.]),
                       'offset': jnp.array([0., 1., 0., -1.])}}
  np.testing.assert_allclose(
      t.apply(params, x),
      x * params['affine']['scale'] + params['affine']['offset'], rtol=1e-6)
  t = hk.without_apply_rng(hk.transform(
      lambda x: layers.make_norm('none')('identity')(x, True)))
  assert _init(t, x) == {}
  np.testing.assert_array_equal(t.apply({}, x), x)


def test_unknown_norm():
  with pytest.raises(ValueError, match="unknown norm 'batch'; choose from "
                     'bn, gn, ln, affine, none'):
    layers.make_norm('batch')


def test_group_norm_groups_must_divide_channels():
  t = hk.transform(lambda x: layers.GroupNorm(5, name='my_gn')(x))
  with pytest.raises(ValueError, match='my_gn: num_groups=5 does not divide '
                     'the 12 channels'):
    t.init(None, jnp.zeros((1, 2, 2, 12)))


@pytest.mark.parametrize('make,shape,axis', [
    pytest.param(lambda: layers.WSConv2D(6, 3), (3, 3, 5, 6), (0, 1, 2),
                 id='conv'),
    pytest.param(lambda: layers.WSLinear(6), (20, 6), (0,), id='linear'),
])
def test_standardized_weight_statistics(make, shape, axis):
  # Raw weights with a different mean and scale for each output unit.
  rng = np.random.default_rng(0)
  raw = jnp.asarray(rng.standard_normal(shape)
                    * rng.uniform(0.5, 5., shape[-1:])
                    + rng.uniform(-3., 3., shape[-1:]), jnp.float32)
  t = hk.without_apply_rng(hk.transform(lambda: make().effective_weight(raw)))
  w = t.apply({})
  np.testing.assert_allclose(jnp.mean(w, axis=axis), 0., atol=1e-6)
  # var = v / (v + 1e-4) with v >= 0.25.
  np.testing.assert_allclose(jnp.var(w, axis=axis), 1., atol=1e-3)


def test_standardization_of_constant_weight_is_finite():
  t = hk.without_apply_rng(hk.transform(
      lambda: layers.WSLinear(3).effective_weight(jnp.ones((4, 3)))))
  np.testing.assert_array_equal(t.apply({}), np.zeros((4, 3)))


def _net(ws, ws_eps=1e-4):
  def forward(x):
    emb = _tiny('gn', ws, ws_eps=ws_eps)(x, True)
    proj = networks.MLP(16, 8, norm='gn', weight_standardization=ws,
                        num_groups=4, ws_eps=ws_eps, name='projector')
    return proj(emb, True)
  return _transform(forward)


def test_ws_adds_no_parameters():
  x = _images(0)
  p_ws, _ = jax.eval_shape(_net(True).init, jax.random.PRNGKey(0), x)
  p_plain, _ = jax.eval_shape(_net(False).init, jax.random.PRNGKey(0),
                              x)
  assert jax.tree.map(jnp.shape, p_ws) == jax.tree.map(jnp.shape, p_plain)
  assert _num_params(p_ws) == _num_params(p_plain)


def test_invariant_to_raw_weight_affine_changes():
  # The invariance is exact only as ws_eps -> 0: with the default 1e-4 and
  # fan-in initialised weights (var ~ 1 / fan_in) eps is not negligible.
  net = _net(True, ws_eps=1e-12)
  x = _images(0)
  params, state = _fill(net, x)

  def distort(path, w):
    if path[-1].key != 'w':
      return w
    shift = _normal(w.size, w.shape[-1:])
    return 3.7 * w + shift
  distorted = jax.tree_util.tree_map_with_path(distort, params)
  assert _rel_err(distorted['projector/linear']['w'],
                  params['projector/linear']['w']) > 1.
  apply = jax.jit(net.apply)
  out, _ = apply(params, state, None, x)
  out_distorted, _ = apply(distorted, state, None, x)
  assert _rel_err(out_distorted, out) < 1e-4


def test_gradients_reach_raw_weights():
  # One bottleneck block and a head: a whole ResNet's backward pass takes
  # XLA's CPU backend over 10 s to compile, and adds nothing here.
  def forward(x):
    block = networks.ResidualBlock(
        4, stride=2, bottleneck=True, use_projection=True,
        conv=layers.make_conv(True), norm=layers.make_norm('gn',
                                                               num_groups=2))
    emb = jnp.mean(block(x, True), axis=(1, 2))
    return networks.MLP(8, 4, norm='gn', weight_standardization=True,
                        num_groups=2)(emb, True)
  net = _transform(forward)
  x = _normal(0, (4, 6, 6, 8))
  params, state = _fill(net, x)
  loss = lambda p: jnp.sum(jnp.sin(3. * net.apply(p, state, None, x)[0]))
  grads = jax.jit(jax.grad(loss))(params)
  weight_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                  if path[-1].key == 'w']
  assert len(weight_grads) == 6  # 4 convs + 2 linear layers.
  for g in weight_grads:
    assert np.all(np.isfinite(g))
    assert float(jnp.linalg.norm(g)) > 1e-6


@pytest.mark.parametrize('norm', ('gn', 'ln', 'affine', 'none'))
@pytest.mark.parametrize('ws', (False, True))
def test_example_unaffected_by_rest_of_batch(norm, ws):
  def forward(x):
    emb = _tiny(norm, ws)(x, True)
    return emb, networks.MLP(16, 8, norm=norm, weight_standardization=ws,
                             num_groups=4)(emb, True)
  net = _transform(forward)
  x, others = _images(0), _images(1)
  params, state = _fill(net, x)
  apply = jax.jit(net.apply)
  (emb_a, out_a), _ = apply(params, state, None, x)
  # Same first example, different companions.
  (emb_b, out_b), _ = apply(params, state, None, others.at[0].set(x[0]))
  assert _rel_err(emb_b[0], emb_a[0]) < 1e-5
  assert _rel_err(out_b[0], out_a[0]) < 1e-5
  assert _rel_err(emb_b[1], emb_a[1]) > 1e-2


def test_batch_norm_in_training_depends_on_batch():
  net = _transform(lambda x: _tiny('bn')(x, True))
  x, others = _images(0), _images(1)
  params, state = _fill(net, x)
  apply = jax.jit(net.apply)
  emb_a, _ = apply(params, state, None, x)
  emb_b, _ = apply(params, state, None, others.at[0].set(x[0]))
  assert _rel_err(emb_b[0], emb_a[0]) > 1e-2


@pytest.mark.parametrize('norm,ws', [
    pytest.param('bn', False, id='bn'),
    pytest.param('gn', False, id='gn'),
    pytest.param('gn', True, id='gn_ws'),
])
def test_resnet50_parameter_count(norm, ws):
  params, _ = _shapes(
      lambda x: networks.ResNet50(norm=norm, weight_standardization=ws)(
          x, True), jnp.zeros((1, 32, 32, 3)))
  # torchvision's 25,557,032 less the 2048 x 1000 + 1000 classifier.
  assert _num_params(params) == 23_508_032


def test_resnet18_parameter_count_and_shortcuts_are_deepminds():
  params, _ = _shapes(lambda x: networks.ResNet18()(x, True),
                      jnp.zeros((1, 32, 32, 3)))
  # hk.nets.ResNet18 without its logits has 11,176,512 (a projection only
  # where the shape changes); DeepMind's BYOL ResNet gives the first block of
  # every group one, so block_group_0 adds a 64x64 1x1 conv and its norm.
  assert _num_params(params) == 11_176_512 + 64 * 64 + 2 * 64
  for group in range(4):
    prefix = f'res_net18/~/block_group_{group}/~/block_0/~/'
    assert prefix + 'shortcut_conv' in params
    assert prefix + 'shortcut_batchnorm' in params
    assert f'res_net18/~/block_group_{group}/~/block_1/~/shortcut_conv' not in (
        params)


@pytest.mark.parametrize('depth', sorted(networks.RESNET_DEPTHS))
def test_depth_classes_are_resnets_named_as_deepminds(depth):
  cls = getattr(networks, f'ResNet{depth}')
  assert issubclass(cls, networks.ResNet) and cls.__name__ == f'ResNet{depth}'
  params, _ = _shapes(
      lambda x: cls(width_multiplier=0.125, norm='gn', num_groups=2)(x, True),
      jnp.zeros((1, 32, 32, 3)))
  blocks, bottleneck = networks.RESNET_DEPTHS[depth]
  prefix = f'res_net{depth}/~/'
  assert all(m.startswith(prefix) for m in params)
  assert f'{prefix}initial_conv' in params
  for group, count in enumerate(blocks):
    convs = [m for m in params
             if m.startswith(f'{prefix}block_group_{group}/~/block_')
             and '/~/conv_' in m]
    assert len(convs) == count * (3 if bottleneck else 2)
    assert f'{prefix}block_group_{group}/~/block_{count - 1}/~/conv_0' in params


def test_resnet50_names_follow_deepmind_layout():
  params, state = _shapes(lambda x: networks.ResNet50()(x, True),
                          jnp.zeros((1, 32, 32, 3)))
  block = 'res_net50/~/block_group_0/~/block_0/~/'
  expected = {
      'res_net50/~/initial_conv': {'w': (7, 7, 3, 64)},
      'res_net50/~/initial_batchnorm': {'scale': (1, 1, 1, 64),
                                        'offset': (1, 1, 1, 64)},
      block + 'conv_0': {'w': (1, 1, 64, 64)},
      block + 'conv_1': {'w': (3, 3, 64, 64)},
      block + 'conv_2': {'w': (1, 1, 64, 256)},
      block + 'shortcut_conv': {'w': (1, 1, 64, 256)},
      'res_net50/~/block_group_3/~/block_2/~/conv_2': {
          'w': (1, 1, 512, 2048)},
  }
  shapes = jax.tree.map(lambda a: a.shape, params)
  for module, leaves in expected.items():
    assert shapes[module] == leaves
  for name in ('batchnorm_0', 'batchnorm_1', 'batchnorm_2',
               'shortcut_batchnorm'):
    assert set(shapes[block + name]) == {'scale', 'offset'}
    assert block + name + '/~/mean_ema' in state
  assert 'res_net50/~/block_group_0/~/block_1/~/shortcut_conv' not in params
  assert len([m for m in params if m.endswith('conv') or '/conv_' in m]) == 53
  assert len([m for m in params if 'batchnorm' in m]) == 53
  assert len(params) == 106


@pytest.mark.parametrize('kind', KINDS)
def test_norm_parameters_are_named_for_the_weight_decay_mask(kind):
  def forward(x):
    emb = _tiny(kind, True, num_classes=None)(x, True)
    return networks.MLP(16, 8, norm=kind, num_groups=4)(emb, True)
  params, _ = _shapes(forward, _images(0))
  tag = {'bn': 'batchnorm', 'gn': 'groupnorm', 'ln': 'layernorm',
         'affine': 'affine', 'none': None}[kind]
  norm_modules = 0
  for module, leaves in params.items():
    last = module.split('/')[-1]
    if set(leaves) == {'scale', 'offset'}:
      # The heads' BatchNorm is DeepMind's `batch_norm`.
      assert tag in last or (kind == 'bn' and last == 'batch_norm')
      norm_modules += 1
    else:
      assert 'norm' not in module
      assert 'affine' not in module
      assert set(leaves) in ({'w'}, {'w', 'b'})
  # Stem + 8 in blocks (2 per block) + 4 shortcuts (the first block of
  # every group, as DeepMind's) + 1 in the MLP.
  assert norm_modules == 0 if kind == 'none' else 14
  if kind == 'gn':
    assert 'res_net/~/initial_groupnorm' in params
    assert 'res_net/~/block_group_1/~/block_0/~/shortcut_groupnorm' in params
    assert 'mlp/groupnorm' in params


def test_embedding_sizes_and_logits():
  def shapes(make, size=32):
    return jax.eval_shape(
        _transform(lambda x: make()(x, True)).apply,
        *_shapes(lambda x: make()(x, True), jnp.zeros((2, size, size, 3))),
        None, jnp.zeros((2, size, size, 3)))[0]
  assert shapes(lambda: networks.ResNet50(width_multiplier=0.25)) == (
      jax.ShapeDtypeStruct((2, 512), jnp.float32))
  assert shapes(lambda: networks.ResNet18(width_multiplier=2.)).shape == (
      2, 1024)
  assert shapes(
      lambda: networks.ResNet34(num_classes=10, norm='gn')).shape == (2, 10)
  out = shapes(lambda: networks.resnet(
      50, blocks_per_group=(1, 1, 1, 1), width_multiplier=0.25))
  assert out.shape == (2, 512)


def test_resnet_helper():
  # The fields of configs/byol.py's model.encoder, as they are given.
  encoder_config = dict(depth=50, width_multiplier=1.0, stem='imagenet',
                        blocks_per_group=(), zero_init_last_scale=False,
                        norm='gn', weight_standardization=True,
                        num_groups=16)
  params, _ = _shapes(
      lambda x: networks.resnet(**encoder_config, dtype='float32')(x, True),
      jnp.zeros((1, 32, 32, 3)))
  assert _num_params(params) == 23_508_032
  assert 'res_net50/~/block_group_3/~/block_2/~/groupnorm_2' in params
  params, _ = _shapes(lambda x: networks.resnet(101, norm='gn')(x, True),
                      jnp.zeros((1, 32, 32, 3)))
  assert len([m for m in params if m.startswith('res_net101/~/block_group_2/')
              and m.endswith('conv_0')]) == 23
  params, _ = _shapes(
      lambda x: networks.resnet(18, blocks_per_group=(1, 2, 1, 1),
                                width_multiplier=0.125)(x, True),
      jnp.zeros((1, 16, 16, 3)))
  assert 'res_net/~/block_group_1/~/block_1/~/conv_1' in params
  assert 'res_net/~/block_group_1/~/block_1/~/conv_2' not in params


@pytest.mark.parametrize('overrides,message', [
    pytest.param(dict(norm='gn', num_groups=16),
                 r'res_net/~/initial_groupnorm: num_groups=16 does not divide '
                 'the 8 channels', id='gn_groups'),
    pytest.param(dict(norm='batchnorm'), "unknown norm 'batchnorm'; choose "
                 'from bn, gn, ln, affine, none', id='unknown_norm'),
    pytest.param(dict(stem='cifar'), "res_net: unknown stem 'cifar'; choose "
                 'from imagenet, small', id='unknown_stem'),
    pytest.param(dict(width_multiplier=0.),
                 'res_net: width_multiplier must be positive, got 0.0',
                 id='zero_width'),
    pytest.param(dict(width_multiplier=0.001),
                 r'res_net/~/initial_conv: width_multiplier=0.001 leaves 0 of '
                 'its 64 channels', id='too_thin'),
    pytest.param(dict(blocks_per_group=(1, 1, 1)),
                 r'res_net: blocks_per_group must be 4 positive counts, got '
                 r'\(1, 1, 1\)', id='blocks'),
])
def test_impossible_configuration(overrides, message):
  kwargs = dict(blocks_per_group=(1, 1, 1, 1), bottleneck=False,
                width_multiplier=0.125, stem='small')
  kwargs.update(overrides)
  with pytest.raises(ValueError, match=message):
    _shapes(lambda x: networks.ResNet(**kwargs)(x, True),
            jnp.zeros((1, 16, 16, 3)))


def test_unknown_depth():
  with pytest.raises(ValueError, match='unknown ResNet depth 20; choose from '
                     '18, 34, 50, 101, 152, 200'):
    networks.resnet(20)


def test_mlp_groups_must_divide_hidden_size():
  with pytest.raises(ValueError, match='mlp/groupnorm: num_groups=16 does not '
                     'divide the 24 channels'):
    _shapes(lambda x: networks.MLP(24, 8, norm='gn')(x, True),
            jnp.zeros((2, 5)))


@pytest.mark.parametrize('kind', ['bn', 'gn', 'affine'])
def test_block_starts_as_relu_of_shortcut(kind):
  def forward(x):
    norm = layers.make_norm(kind, num_groups=4)
    conv = layers.make_conv(True)
    projection = networks.ResidualBlock(
        8, stride=2, bottleneck=True, use_projection=True, conv=conv,
        norm=norm, zero_init_last_scale=True)
    identity = networks.ResidualBlock(
        8, stride=1, bottleneck=False, use_projection=False, conv=conv,
        norm=norm, zero_init_last_scale=True)
    out = projection(x, True)
    shortcut = projection.shortcut_norm(projection.shortcut_conv(x), True)
    return out, shortcut, identity(x[..., :8], True)
  net = _transform(forward)
  x = _normal(0, (2, 8, 8, 16))
  params, state = _init(net, x)
  (out, shortcut, same), _ = jax.jit(net.apply)(params, state, None, x)
  assert out.shape == (2, 4, 4, 32)
  assert float(jnp.mean(out > 0)) > 0.3
  np.testing.assert_allclose(out, jax.nn.relu(shortcut), atol=1e-6)
  np.testing.assert_allclose(same, jax.nn.relu(x[..., :8]), atol=1e-6)


def test_only_last_scale_of_each_block_is_zero():
  net = _transform(
      lambda x: _tiny('gn', zero_init_last_scale=True)(x, True))
  params, _ = _init(net, _images(0))
  zeros = sorted(m for m, p in params.items()
                 if 'scale' in p and not np.any(p['scale']))
  assert zeros == [f'res_net/~/block_group_{i}/~/block_0/~/groupnorm_1'
                   for i in range(4)]
  assert np.all(
      params['res_net/~/block_group_0/~/block_0/~/groupnorm_0']['scale'] == 1.)


def _run(make_local, *make_pmapped):
  """Embeddings (and states) under jit and under each pmapped variant."""
  n = jax.local_device_count()
  x = _images(0, batch=2 * n)
  local = _transform(lambda x: make_local()(x, True))
  params, state = _fill(local, x)
  results = [jax.jit(local.apply)(params, state, None, x)]
  for make in make_pmapped:
    replicated = _transform(lambda x, make=make: make()(x, True))
    out, new_state = jax.pmap(
        replicated.apply, axis_name='i', in_axes=(None, None, None, 0))(
            params, state, None, x.reshape((n, 2) + x.shape[1:]))
    results.append((out.reshape((2 * n, -1)), new_state))
  return results


def test_pmap_matches_jit():
  (out, _), (out_p, _) = _run(lambda: _tiny('gn', True),
                                   lambda: _tiny('gn', True))
  assert _rel_err(out_p, out) < 1e-5


def test_cross_replica_batch_norm_matches_full_batch():
  if jax.local_device_count() < 2:
    pytest.skip('needs several devices (tests/conftest.py forces 4)')
  (out, state), (out_p, state_p), (out_local, _) = _run(
      lambda: _tiny('bn'), lambda: _tiny('bn', cross_replica_axis='i'),
      lambda: _tiny('bn'))
  assert _rel_err(out_p, out) < 1e-5
  key = 'res_net/~/block_group_2/~/block_0/~/batchnorm_1/~/var_ema'
  for device in (0, -1):
    assert _rel_err(state_p[key]['average'][device],
                    state[key]['average']) < 1e-5
  # Per-device statistics would differ from the full batch's.
  assert _rel_err(out_local, out) > 1e-2


@pytest.mark.parametrize('norm,ws', [
    pytest.param('bn', False, id='bn'),
    pytest.param('gn', True, id='gn_ws'),
])
def test_bfloat16_tracks_float32(norm, ws):
  f32 = _transform(lambda x: _tiny(norm, ws)(x, True))
  bf16 = _transform(
      lambda x: _tiny(norm, ws, dtype='bfloat16')(x, True))
  x = _images(0)
  params, state = _fill(f32, x)
  params16, _ = _shapes(lambda x: _tiny(norm, ws, dtype='bfloat16')(x, True),
                        x)
  signature = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert signature(params16) == signature(params)
  out, _ = jax.jit(f32.apply)(params, state, None, x)
  out16, _ = jax.jit(bf16.apply)(params, state, None, x)
  assert out16.dtype == jnp.float32
  # 12 bf16 convs, each rounding to 8 significant bits: a few percent.
  assert float(jnp.linalg.norm(out16 - out) / jnp.linalg.norm(out)) < 5e-2


def test_batch_norm_head():
  net = _transform(
      lambda x: networks.MLP(16, 4, name='projector')(x, True))
  x = _normal(0, (6, 10)) * 3. + 2.
  params, state = _init(net, x)
  assert jax.tree.map(jnp.shape, params) == {
      'projector/linear': {'w': (10, 16), 'b': (16,)},
      'projector/batch_norm': {'scale': (1, 16), 'offset': (1, 16)},
      'projector/linear_1': {'w': (16, 4)},
  }
  assert 'projector/batch_norm/~/mean_ema' in state  # DeepMind's MLP name
  hidden = _transform(lambda x: layers.BatchNorm(
      True, True, 0.9, name='bn')(x, True))
  # The hidden layer is normalised over the batch: after BN each unit has
  # batch mean 0 and variance ~1.
  h = x @ params['projector/linear']['w'] + params['projector/linear']['b']
  hp, hs = _init(hidden, h)
  normed, _ = hidden.apply(hp, hs, None, h)
  np.testing.assert_allclose(jnp.mean(normed, 0), 0., atol=1e-5)
  np.testing.assert_allclose(jnp.var(normed, 0), 1., atol=1e-3)
  out, _ = net.apply(params, state, None, x)
  expected = (jax.nn.relu(normed) @ params['projector/linear_1']['w'])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)




class NormAndWSVariantsTest(chex.TestCase):
  """GroupNorm and the WS layers traced (jit, pmap) equal their plain form and
  a NumPy computation."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_group_norm(self):
    x = 2. * _normal(0, (2, 3, 3, 8)) + 1.
    t = hk.without_apply_rng(hk.transform(
        lambda x: layers.GroupNorm(4, name='gn')(x, True)))
    params = _randomize(_init(t, x), seed=2)
    out = self.variant(t.apply)(params, x)
    chex.assert_shape(out, x.shape)
    xg = np.asarray(x, np.float64).reshape(2, 3, 3, 4, 2)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    normed = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    expected = (normed * np.asarray(params['gn']['scale']) +
                np.asarray(params['gn']['offset']))
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_ws_conv_and_linear(self):
    x = _normal(1, (2, 5, 5, 3))
    t = hk.without_apply_rng(hk.transform(
        lambda x: layers.WSLinear(4, name='lin')(
            jnp.mean(layers.WSConv2D(6, 3, name='conv')(x), axis=(1, 2)))))
    params = _randomize(_init(t, x), seed=3, keys=('w', 'b'))
    out = self.variant(t.apply)(params, x)
    chex.assert_shape(out, (2, 4))

    def standardized(w, axis):
      w = np.asarray(w, np.float64)
      return (w - w.mean(axis, keepdims=True)) / np.sqrt(
          w.var(axis, keepdims=True) + 1e-10)
    conv = jax.lax.conv_general_dilated(
        np.asarray(x, np.float64),
        standardized(params['conv']['w'], (0, 1, 2)), (1, 1), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    conv = np.asarray(conv, np.float64)
    expected = (conv.mean(axis=(1, 2)) @ standardized(params['lin']['w'], (0,))
                + np.asarray(params['lin']['b'], np.float64))
    chex.assert_trees_all_close(out, expected, rtol=1e-4, atol=1e-5)
