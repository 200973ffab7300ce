"""The decode-head losses against PyTorch: mmseg 0.27's cross-entropy (banded and
plain, class-weighted), restatements of mmseg's dice / focal and the Lovász-softmax
reference algorithm, the config.loss spec, and the 'auto' class weights."""

import functools
import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax import errors, losses
from cgrseg_jax.data import class_stats, input_pipeline, sources
from cgrseg_jax.models import resize
from configs import custom_t, default
from png_files import write_png
from train_config import with_values

torch = pytest.importorskip('torch')
F = torch.nn.functional


def test_loss_matches_mmseg_formula():
  rng = np.random.default_rng(0)
  logits8 = rng.normal(size=(2, 8, 12, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 6, size=(2, 64, 96))
  labels[0, :20] = 255
  got = float(losses.segmentation_loss(jnp.asarray(logits8), jnp.asarray(labels)))
  t = torch.from_numpy(logits8.transpose(0, 3, 1, 2))
  up = torch.nn.functional.interpolate(t, size=(64, 96), mode='bilinear', align_corners=False)
  per_pixel = torch.nn.functional.cross_entropy(up, torch.from_numpy(labels), ignore_index=255, reduction='none')
  ref = float(per_pixel.mean())  # avg_non_ignore=False: ignored pixels count in the denominator
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # and it is not the mean over labelled pixels only
  assert abs(got - float(per_pixel.sum() / (labels != 255).sum())) > 1e-3


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='disagree'):
    losses.cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5), jnp.int32))


def _torch_decode_loss(logits8, labels):
  t = torch.from_numpy(logits8.transpose(0, 3, 1, 2)).requires_grad_(True)
  up = torch.nn.functional.interpolate(t, size=labels.shape[1:], mode='bilinear', align_corners=False)
  loss = torch.nn.functional.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255, reduction='sum')
  loss = loss / labels.size
  loss.backward()
  return loss.item(), t.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
  'logit_hw, label_hw, banded',
  [((16, 12), (64, 48), True), ((6, 10), (48, 80), True), ((7, 9), (21, 18), False)],
)
def test_loss_value_and_gradient_match_pytorch(logit_hw, label_hw, banded):
  """Training crops (integer factor) take the band-by-band path with its own
  gradient; other sizes resize and autodiff. Both against PyTorch autograd,
  border rows (clamped taps) and ignored pixels included."""
  rng = np.random.default_rng(1)
  logits8 = rng.normal(size=(2, *logit_hw, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=(2, *label_hw)).astype(np.uint8)
  labels[1, :, :7] = 255
  assert (losses._band_plan(logits8.shape, labels.shape) is not None) == banded
  value, grad = jax.value_and_grad(losses.segmentation_loss)(jnp.asarray(logits8), jnp.asarray(labels))
  ref_value, ref_grad = _torch_decode_loss(logits8, labels)
  np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())
  assert float(jax.jit(losses.segmentation_loss)(jnp.asarray(logits8), jnp.asarray(labels))) == pytest.approx(
    ref_value, rel=1e-5
  )


# ------------------------------------------------ the loss registry (config.loss), against independent references

K = 5
IGNORE = 255


def _batch(seed=0, n=2, h=16, w=16, k=K, scale=2.0):
  """Random logits (NHWC, float32) and labels with a band and a scatter of ignored pixels."""
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(n, h, w, k)) * scale).astype(np.float32)
  labels = rng.integers(0, k, size=(n, h, w))
  labels[0, :3] = IGNORE
  labels[rng.random((n, h, w)) < 0.15] = IGNORE
  return logits, labels.astype(np.int64)


def _jax_value_grad(fn, logits, labels):
  value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(logits), jnp.asarray(labels))
  return float(value), np.asarray(grad)


def _torch_value_grad(fn, logits, labels):
  """fn(NCHW float64 logits, labels) -> loss; returns (value, NHWC gradient)."""
  t = torch.from_numpy(logits.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_(True)
  loss = fn(t, torch.from_numpy(labels))
  loss.backward()
  return loss.item(), t.grad.numpy().transpose(0, 2, 3, 1)


def _close(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5 * np.abs(want[1]).max())


# -- restatements of the upstream formulas (torch, float64), written from mmseg's / Berman et al.'s definitions


def _t_dice_1x(pred, target, use_sigmoid=True, naive_dice=False, eps=1e-3):
  k = pred.shape[1]
  p = pred.sigmoid() if use_sigmoid else pred.softmax(1)
  onehot = F.one_hot(target.clamp(0, k), k + 1)[..., :k].permute(0, 3, 1, 2).double()  # ignored -> no class
  p, onehot = p.flatten(1), onehot.flatten(1)
  a = (p * onehot).sum(1)
  if naive_dice:
    d = (2 * a + eps) / (p.sum(1) + onehot.sum(1) + eps)
  else:
    d = 2 * a / ((p * p).sum(1) + eps + (onehot * onehot).sum(1) + eps)
  return (1 - d).mean()


def _t_dice_0x(pred, target, smooth=1.0, exponent=2.0, class_weight=None):
  k = pred.shape[1]
  p = pred.softmax(1)
  onehot = F.one_hot(target.clamp(0, k - 1), k).double()
  valid = (target != IGNORE).double()
  total = 0
  for c in range(k):
    pc, tc = p[:, c].flatten(1), onehot[..., c].flatten(1)
    num = (pc * tc * valid.flatten(1)).sum(1) * 2 + smooth
    den = (pc.pow(exponent) + tc.pow(exponent)).sum(1) + smooth
    loss = (1 - num / den).mean()
    total = total + (loss * class_weight[c] if class_weight is not None else loss)
  return total / k


def _t_focal(pred, target, gamma=2.0, alpha=0.5, class_weight=None):
  k = pred.shape[1]
  x = pred.permute(0, 2, 3, 1).reshape(-1, k)
  t = target.reshape(-1)
  valid = (t != IGNORE).double()[:, None]
  onehot = F.one_hot(torch.where(t == IGNORE, 0, t), k).double()
  alpha = torch.tensor(alpha, dtype=torch.float64)
  s = x.sigmoid()
  one_minus_pt = (1 - s) * onehot + s * (1 - onehot)
  weight = (alpha * onehot + (1 - alpha) * (1 - onehot)) * one_minus_pt.pow(gamma)
  loss = F.binary_cross_entropy_with_logits(x, onehot, reduction='none') * weight * valid
  if class_weight is not None:
    loss = loss * torch.tensor(class_weight, dtype=torch.float64)
  return loss.mean()


def _t_lovasz_grad(gt_sorted):
  gts = gt_sorted.sum()
  intersection = gts - gt_sorted.cumsum(0)
  union = gts + (1 - gt_sorted).cumsum(0)
  jaccard = 1 - intersection / union
  return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _t_lovasz_flat(probs, labels, classes, class_weight):
  keep = labels != IGNORE
  probs, labels = probs[keep], labels[keep]
  if probs.numel() == 0:
    return probs.sum() * 0
  losses = []
  for c in range(probs.shape[1]) if isinstance(classes, str) else classes:
    fg = (labels == c).double()
    if classes == 'present' and fg.sum() == 0:
      continue
    errors_, perm = (fg - probs[:, c]).abs().sort(descending=True)
    loss = torch.dot(errors_, _t_lovasz_grad(fg[perm]))
    losses.append(loss * class_weight[c] if class_weight is not None else loss)
  return torch.stack(losses).mean()


def _t_lovasz(pred, target, per_image=False, classes='present', class_weight=None):
  k = pred.shape[1]
  probs = pred.softmax(1).permute(0, 2, 3, 1)
  if per_image:
    return torch.stack(
      [_t_lovasz_flat(p.reshape(-1, k), t.reshape(-1), classes, class_weight) for p, t in zip(probs, target)]
    ).mean()
  return _t_lovasz_flat(probs.reshape(-1, k), target.reshape(-1), classes, class_weight)


CLASS_WEIGHT = [0.5, 2.0, 1.0, 0.0, 3.0]


@pytest.mark.parametrize(
  'ours, ref, kw',
  [
    (losses.dice_loss, _t_dice_1x, {}),
    (losses.dice_loss, _t_dice_1x, {'naive_dice': True, 'eps': 0.5}),
    (losses.dice_loss, _t_dice_1x, {'use_sigmoid': False}),
    (losses.dice_loss_0x, _t_dice_0x, {}),
    (losses.dice_loss_0x, _t_dice_0x, {'smooth': 0.5, 'exponent': 3.0, 'class_weight': CLASS_WEIGHT}),
    (losses.focal_loss, _t_focal, {}),
    (losses.focal_loss, _t_focal, {'gamma': 1.5, 'alpha': [0.1, 0.3, 0.5, 0.7, 0.9], 'class_weight': CLASS_WEIGHT}),
    (losses.lovasz_softmax_loss, _t_lovasz, {}),
    (losses.lovasz_softmax_loss, _t_lovasz, {'per_image': True}),
    (losses.lovasz_softmax_loss, _t_lovasz, {'classes': 'all', 'class_weight': CLASS_WEIGHT}),
    (losses.lovasz_softmax_loss, _t_lovasz, {'per_image': True, 'classes': [0, 2, 4]}),
  ],
  ids=lambda v: v.__name__ if callable(v) else ','.join(map(str, v)) if isinstance(v, dict) else None,
)
def test_loss_and_gradient_match_torch_restatement(ours, ref, kw):
  logits, labels = _batch(seed=3)
  if kw.get('per_image'):
    labels[1, :, :] = np.where(labels[1] == 1, 3, labels[1])  # a class absent from one image only
  got = _jax_value_grad(functools.partial(ours, **kw), logits, labels)
  want = _torch_value_grad(functools.partial(ref, **kw), logits, labels)
  _close(got, want)


def test_lovasz_image_without_labelled_pixels_counts_zero():
  logits, labels = _batch(seed=4)
  labels[1] = IGNORE
  got = _jax_value_grad(functools.partial(losses.lovasz_softmax_loss, per_image=True), logits, labels)
  want = _torch_value_grad(functools.partial(_t_lovasz, per_image=True), logits, labels)
  _close(got, want)
  assert np.all(got[1][1] == 0)


def test_dice_mask_ignored_leaves_ignored_pixels_out():
  logits, labels = _batch(seed=5)
  value, grad = _jax_value_grad(functools.partial(losses.dice_loss, mask_ignored=True), logits, labels)
  assert np.all(grad[labels == IGNORE] == 0)
  keep = labels != IGNORE  # the same with the ignored pixels' predictions at sigmoid -inf = 0
  zeroed = np.where(keep[..., None], logits, -1e4).astype(np.float32)
  assert value == pytest.approx(_t_dice_1x(torch.from_numpy(zeroed.transpose(0, 3, 1, 2)), torch.from_numpy(labels)))


def _torch_weighted_ce(weight, avg_non_ignore=False):
  def fn(logits8, labels):
    up = F.interpolate(logits8, size=labels.shape[1:], mode='bilinear', align_corners=False)
    w = torch.tensor(weight, dtype=torch.float64)
    per_pixel = F.cross_entropy(up, labels, weight=w, reduction='none', ignore_index=IGNORE)
    return per_pixel.sum() / (labels != IGNORE).sum() if avg_non_ignore else per_pixel.mean()

  return fn


def test_weighted_cross_entropy_banded_equals_plain_equals_torch():
  logits8, _ = _batch(seed=6, h=4, w=4)
  _, labels = _batch(seed=7, h=16, w=16)
  assert losses._band_plan(logits8.shape, labels.shape) is not None
  banded = _jax_value_grad(functools.partial(losses.segmentation_loss, class_weight=CLASS_WEIGHT), logits8, labels)

  def plain(x, y):
    return losses.cross_entropy(resize.resize_bilinear(x, y.shape[1:]), y, IGNORE, CLASS_WEIGHT)

  plain = _jax_value_grad(plain, logits8, labels)
  want = _torch_value_grad(_torch_weighted_ce(CLASS_WEIGHT), logits8, labels)
  _close(banded, want)
  _close(plain, want)
  # the same through config.loss; and avg_non_ignore divides by the labelled pixels only
  built = losses.build_loss([('cross_entropy', 1.0, {'class_weight': CLASS_WEIGHT})], None, IGNORE)
  assert float(built(jnp.asarray(logits8), jnp.asarray(labels))) == pytest.approx(want[0], rel=1e-5)
  spec = [('cross_entropy', 1.0, {'class_weight': CLASS_WEIGHT, 'avg_non_ignore': True})]
  got = _jax_value_grad(losses.build_loss(spec, None, IGNORE), logits8, labels)
  _close(got, _torch_value_grad(_torch_weighted_ce(CLASS_WEIGHT, avg_non_ignore=True), logits8, labels))


def _config(**values):
  c = default.get_config('synthetic')
  c.data.synthetic.num_classes = K
  c.model.num_classes = K
  return with_values(c, **values)


def test_list_spec_is_the_weighted_sum_of_its_entries():
  logits8, _ = _batch(seed=8, h=8, w=8)
  _, labels = _batch(seed=9, h=16, w=16)
  spec = [
    ('cross_entropy', 1.0),
    ('dice', 3.0, {'naive_dice': True}),
    ('focal', 0.5, {'gamma': 1.0}),
    ('ohem', 2.0, {'thresh': 0.7, 'min_kept': 10}),
  ]
  config = _config(loss=spec)  # the config field takes the list
  built = jax.jit(losses.build_loss(config.loss, config, IGNORE))
  x, y = jnp.asarray(logits8), jnp.asarray(labels)

  @jax.jit
  def want(x, y):
    up = resize.resize_bilinear(x, (16, 16))
    return (
      losses.segmentation_loss(x, y)
      + 3.0 * losses.dice_loss(up, y, naive_dice=True)
      + 0.5 * losses.focal_loss(up, y, gamma=1.0)
      + 2.0 * losses.ohem_cross_entropy(up, y, thresh=0.7, min_kept=10)
    )

  assert float(built(x, y)) == pytest.approx(float(want(x, y)), rel=1e-6)
  up = resize.resize_bilinear(x, (16, 16))
  # a name alone, and one entry on its own, are the same loss
  plain = float(losses.segmentation_loss(x, y))
  assert float(losses.build_loss('cross_entropy', config, IGNORE)(x, y)) == pytest.approx(plain, rel=1e-6)
  assert float(losses.build_loss(('cross_entropy', 2.0), config, IGNORE)(x, y)) == pytest.approx(2 * plain, rel=1e-6)
  # ohem without options reads config.ohem
  config.ohem.min_kept = 10
  ohem = jax.jit(losses.build_loss('ohem', config, IGNORE))(x, y)
  want = jax.jit(lambda up, y: losses.ohem_cross_entropy(up, y, 0.9, 10))(up, y)
  assert float(ohem) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize(
  'spec, match',
  [
    ('dise', r"config.loss='dise'; expected one of \['cross_entropy', 'dice'"),
    ([('cross_entropy', 1.0), ('dise', 1.0)], r"config.loss\[1\]='dise'"),
    ([('dice', 1.0, {'smoth': 1})], r"config.loss\[0\] \('dice'\): unknown option 'smoth'; expected some of"),
    ([('focal', 1.0, {'gamma': 'two'})], r"config.loss\[0\] \('focal'\): gamma='two'; expected a number >= 0"),
    ([('focal', 1.0, {'alpha': [0.5] * 3})], r'alpha=\[0.5, 0.5, 0.5\]; expected 5 numbers in \[0, 1\]'),
    ([('cross_entropy', 1.0, {'class_weight': [1.0] * 4})], r'class_weight=.*expected 5 weights'),
    ([('cross_entropy', 1.0, {'class_weight': 'median'})], r"class_weight='median'; expected 'auto' or a list"),
    (
      [('cross_entropy', 1.0, {'class_weight': 'auto', 'class_weight_method': 'mean'})],
      r"class_weight_method='mean'; expected one of \['median_frequency', 'enet'\]",
    ),
    ([('cross_entropy', 1.0, {'class_weight_method': 'enet'})], r"class_weight_method='enet'; expected nothing"),
    ([('lovasz', 1.0, {'classes': 'some'})], r"classes='some'; expected 'present', 'all' or a list"),
    ([('lovasz', 1.0, {'classes': [0, 7]})], r'classes=\[0, 7\]; expected distinct class ids in \[0, 5\)'),
    ([('lovasz', 1.0, {'per_image': 1})], r'per_image=1; expected True or False'),
    ([('dice', -1.0)], r"config.loss\[0\] \('dice'\): weight -1.0; expected a number >= 0"),
    ([('dice', 1.0, 3)], r"config.loss\[0\] \('dice'\): options 3; expected a dict"),
    ([('dice',)], r"config.loss\[0\]=\('dice',\); expected \(name, weight\)"),
    ([], r'config.loss=\[\]; expected a loss name or a list'),
    (3, r'config.loss=3; expected a loss name or a list'),
  ],
)
def test_bad_loss_specs_are_config_errors_naming_the_key(spec, match):
  with pytest.raises(errors.ConfigError, match=match):
    losses.build_loss(spec, _config(), IGNORE)


# -- class weights 'auto': the training labels' histogram, counted once, cached in the workdir


def _write_custom(root, n=3, classes=4, seed=0, start=0):
  """images/train/*.png + grey annotations/train/*.png with raw ids 0..classes (reduce_zero_label) and 255."""
  rng = np.random.default_rng(seed)
  (root / 'images' / 'train').mkdir(parents=True, exist_ok=True)
  (root / 'annotations' / 'train').mkdir(parents=True, exist_ok=True)
  written = []
  for i in range(start, start + n):
    h, w = 12 + i, 16
    raw = rng.integers(0, classes, size=(h, w))  # raw 0 ('other') .. classes - 1; raw `classes` stays absent
    raw[rng.random((h, w)) < 0.1] = IGNORE
    cv2.imwrite(str(root / 'images' / 'train' / f's{i}.png'), np.zeros((h, w, 3), np.uint8))
    write_png(str(root / 'annotations' / 'train' / f's{i}.png'), raw)
    written.append(raw)
  return written


def _custom_config(root, classes=4):
  c = custom_t.get_config()
  c.data.root = str(root)
  c.data.custom.img_dir = 'images/{split}'
  c.data.custom.ann_dir = 'annotations/{split}'
  c.data.custom.img_suffix = '.png'
  c.data.custom.num_classes = classes
  c.data.custom.reduce_zero_label = True
  return c


def _numpy_counts(raw_labels, classes):
  counts = np.zeros(256, np.int64)
  for raw in raw_labels:
    ids = np.where(raw == 0, IGNORE, np.where(raw == IGNORE, IGNORE, raw - 1))  # mmseg's reduce_zero_label
    counts += np.bincount(ids.ravel(), minlength=256)
  return counts[:classes]


def _numpy_weights(counts, method):
  f = counts / counts.sum()
  if method == 'enet':
    return 1 / np.log(1.02 + f)
  w = np.zeros(len(counts))
  w[counts > 0] = np.median(f[counts > 0]) / f[counts > 0]
  return w


@pytest.fixture
def read_counter(monkeypatch):
  calls = []
  real = sources.read_label

  def counting(path):
    calls.append(path)
    return real(path)

  monkeypatch.setattr(sources, 'read_label', counting)
  return calls


def test_auto_class_weights_from_a_folder_dataset_cached_and_invalidated(tmp_path, read_counter):
  root, work = tmp_path / 'data', tmp_path / 'work'
  raw = _write_custom(root)
  config = _custom_config(root)
  counts = _numpy_counts(raw, 4)
  assert counts[3] == 0  # an absent class: weight 0 (median frequency), out of the median

  hist = class_stats.train_histogram(config, work)
  np.testing.assert_array_equal(hist.counts, counts)
  assert len(read_counter) == 3 and 'saved to' in hist.origin
  cached = json.loads((work / class_stats.HISTOGRAM_FILE).read_text())
  assert cached['source']['dataset'] == 'custom' and cached['source']['split'] == 'train'
  assert cached['source']['images'] == 3 and cached['source']['root'] == str(root)
  assert cached['counts'] == counts.tolist()
  mtime = (work / class_stats.HISTOGRAM_FILE).stat().st_mtime_ns

  for method in class_stats.WEIGHT_METHODS:
    w = class_stats.class_weights(hist.counts, method)
    np.testing.assert_allclose(w, _numpy_weights(counts, method), rtol=1e-6)
  assert class_stats.class_weights(counts)[3] == 0

  # the loss reuses the cache (no label read) and weights the cross-entropy with the enet weights
  spec = [('cross_entropy', 1.0, {'class_weight': 'auto', 'class_weight_method': 'enet'})]
  built = losses.build_loss(spec, config, IGNORE, workdir=work)
  assert len(read_counter) == 3
  assert (work / class_stats.HISTOGRAM_FILE).stat().st_mtime_ns == mtime
  logits8, labels = _batch(seed=10, h=4, w=4, k=4)
  labels = np.repeat(np.repeat(labels, 4, 1), 4, 2)
  want = losses.segmentation_loss(
    jnp.asarray(logits8), jnp.asarray(labels), class_weight=_numpy_weights(counts, 'enet')
  )
  assert float(built(jnp.asarray(logits8), jnp.asarray(labels))) == pytest.approx(float(want), rel=1e-6)

  # one more training image: a different source, counted again
  raw += _write_custom(root, n=1, seed=1, start=3)
  hist = class_stats.train_histogram(config, work)
  np.testing.assert_array_equal(hist.counts, _numpy_counts(raw, 4))
  assert len(read_counter) == 3 + 4
  assert json.loads((work / class_stats.HISTOGRAM_FILE).read_text())['source']['images'] == 4


def test_auto_class_weights_from_synthetic_and_shards(tmp_path):
  config = _config(**{'data.synthetic.image_size': (16, 20), 'data.synthetic.num_train': 3, 'seed': 2})
  src = sources.make_source('synthetic', None, 'train', **input_pipeline.source_kwargs(config, 'train'))[0]
  counts = np.bincount(np.concatenate([src[i]['label'].ravel() for i in range(3)]), minlength=K)[:K]
  hist = class_stats.train_histogram(config, tmp_path / 'work')
  np.testing.assert_array_equal(hist.counts, counts)
  # a different seed draws other scenes: the cached counts are not reused
  other = class_stats.train_histogram(
    _config(**{'data.synthetic.image_size': (16, 20), 'data.synthetic.num_train': 3}), tmp_path / 'work'
  )
  assert 'saved to' in other.origin

  input_pipeline.write_shards(config, str(tmp_path / 'shards'), 2, kinds=('train',))
  config.data.shards = str(tmp_path / 'shards')
  hist = class_stats.train_histogram(config, tmp_path / 'work2')
  np.testing.assert_array_equal(hist.counts, counts)
  assert json.loads((tmp_path / 'work2' / class_stats.HISTOGRAM_FILE).read_text())['source']['shards'].endswith(
    'shards/train'
  )
