"""Segmenter against the PyTorch reference running mmseg 0.27's test pipeline,
which is re-implemented here with numpy/cv2/torch (keep-ratio resize, normalise,
pad to 32, whole / slide inference, crop, resize to the original size,
softmax, multi-scale + flip averaging)."""

import math

import cv2
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgrseg_jax.torch_reference import cgrseg as ref
from cgrseg_jax import loader
from cgrseg_jax.inference import InferenceError, Segmenter, confidence_maps
from toy_family import ToySeg

K = 19
SCALE = (192, 96)  # small stand-in for (2048, 512): images stay tiny
# Five sizes, three input buckets (96x128, 160x96, 64x192): several sizes share
# a bucket after the keep-ratio resize, which is what bucketing relies on.
SIZES = [(70, 90), (140, 180), (120, 80), (60, 40), (50, 200)]
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def _image(hw, seed):
  """Smooth random RGB image (blobs, not pixel noise)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(hw[0] // 8, 2), max(hw[1] // 8, 2), 3)).astype(np.uint8)
  return cv2.resize(small, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope='module')
def torch_model():
  # One thread: the tiny reference is fast, and two threads on a busy 2-core
  # machine spin-wait (seconds per forward instead of milliseconds).
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  model = ref.randomize_(ref.build_torch_segmentor('tiny', K), seed=0)
  yield model.eval()
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def checkpoint(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt') / 'cgrseg_tiny.pth'
  torch.save({'meta': {}, 'state_dict': torch_model.state_dict()}, path)
  return str(path)


@pytest.fixture(scope='module')
def segmenter(checkpoint):
  return Segmenter.from_checkpoint(checkpoint, dataset='cityscapes', img_scale=SCALE)


@pytest.fixture(scope='module')
def toy_segmenter():
  """The Segmenter over the toy family's network: for the batching and compile counting,
  which are the Segmenter's own (each CGRSeg bucket would add seconds of compiles)."""
  model = ToySeg(K)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
  return Segmenter(model, variables, dataset='cityscapes', img_scale=SCALE)


# ------------------------------------------------------ reference pipeline


def _ref_resize(rgb, scale):
  h, w = rgb.shape[:2]
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  nh, nw = int(h * f + 0.5), int(w * f + 0.5)
  bgr = np.ascontiguousarray(rgb[..., ::-1])  # mmcv loads BGR and resizes BGR
  return cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)


def _ref_tensor(bgr):
  """mmseg Normalize (to RGB) + Pad(size_divisor=32, pad_val=0), NCHW."""
  x = (bgr[..., ::-1].astype(np.float32) - MEAN) / STD
  h, w = x.shape[:2]
  padded = np.zeros((math.ceil(h / 32) * 32, math.ceil(w / 32) * 32, 3), np.float32)
  padded[:h, :w] = x
  return torch.from_numpy(padded).permute(2, 0, 1)[None]


@torch.no_grad()
def _ref_slide_logits(model, x, crop, stride):
  _, _, h, w = x.shape
  rows = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
  cols = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
  preds = torch.zeros((1, K, h, w))
  count = torch.zeros((1, 1, h, w))
  for i in range(rows):
    for j in range(cols):
      y1, x1 = i * stride[0], j * stride[1]
      y2, x2 = min(y1 + crop[0], h), min(x1 + crop[1], w)
      y1, x1 = max(y2 - crop[0], 0), max(x2 - crop[1], 0)
      out = model(x[:, :, y1:y2, x1:x2])
      preds += F.pad(out, (x1, w - x2, y1, h - y2))
      count[:, :, y1:y2, x1:x2] += 1
  assert (count == 0).sum() == 0
  return preds / count


@torch.no_grad()
def _ref_probs(model, rgb, scale, flip=False, slide=None):
  """mmseg `inference`: softmax at the original size, flipped back."""
  bgr = _ref_resize(rgb, scale)
  if flip:
    bgr = np.ascontiguousarray(bgr[:, ::-1])
  x = _ref_tensor(bgr)
  logits = model(x) if slide is None else _ref_slide_logits(model, x, *slide)
  logits = logits[:, :, : bgr.shape[0], : bgr.shape[1]]
  logits = F.interpolate(logits, size=rgb.shape[:2], mode='bilinear', align_corners=False)
  probs = F.softmax(logits, dim=1)
  return probs.flip(dims=(3,)) if flip else probs


def _ref_predict(model, rgb, scale=SCALE, ratios=None, flip=False, slide=None):
  if ratios is None:
    return _ref_probs(model, rgb, scale, slide=slide)[0].argmax(0).numpy()
  total = 0
  for r in ratios:
    for f in (False, True) if flip else (False,):
      total = total + _ref_probs(model, rgb, (int(scale[0] * r), int(scale[1] * r)), flip=f, slide=slide)
  return (total / (len(ratios) * (2 if flip else 1)))[0].argmax(0).numpy()


def _agreement(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.mean(a == b))


# ------------------------------------------------------------------ tests


def test_whole_predict_matches_reference_pipeline(segmenter, torch_model):
  total, agree = 0, 0.0
  for i, hw in enumerate(SIZES):
    img = _image(hw, seed=i)
    got = segmenter.predict(img)
    want = _ref_predict(torch_model, img)
    assert got.shape == hw and got.dtype == np.int32
    assert len(np.unique(want)) > 1  # a non-trivial map
    a = _agreement(got, want)
    assert a >= 0.999, f'image {hw}: {a:.5f} pixel agreement'
    agree += a * got.size
    total += got.size
  assert agree / total >= 0.999


def test_predict_batch_equals_predict(toy_segmenter):
  segmenter = toy_segmenter
  imgs = [_image(hw, seed=10 + i) for i, hw in enumerate(SIZES[:3])]
  one_by_one = [segmenter.predict(im) for im in imgs]
  batched = segmenter.predict_batch(imgs, batch_size=2)
  for a, b in zip(one_by_one, batched):
    # Not bit-equal on every CPU: XLA compiles batch 1 and batch 2 differently, and
    # on an Intel Xeon 1 pixel of 9600 (a near-tie of two classes) flips.
    assert a.shape == b.shape and _agreement(a, b) >= 0.999


def test_slide_matches_reference(segmenter, torch_model):
  # (70, 90) -> resized 96x123, padded 96x128: 2 x 3 overlapping windows,
  # the last row and column shifted back inside the image.
  crop, stride = (64, 64), (48, 40)
  img = _image((70, 90), seed=20)
  seg = Segmenter(
    segmenter.model,
    segmenter.variables,
    dataset='cityscapes',
    img_scale=SCALE,
    mode='slide',
    crop_size=crop,
    stride=stride,
  )
  got = seg.predict(img)
  assert len({k for k in seg.traces if k[0] == 'slide'}) == 1
  want = _ref_predict(torch_model, img, slide=(crop, stride))
  assert _agreement(got, want) >= 0.999


def test_tta_matches_reference(segmenter, torch_model):
  ratios = (0.75, 1.0, 1.5)
  img = _image((70, 90), seed=30)
  got = segmenter.predict(img, tta=dict(scales=ratios, flip=True))
  want = _ref_predict(torch_model, img, ratios=ratios, flip=True)
  assert _agreement(got, want) >= 0.999
  # Flip alone changes the prediction (else the flip-back would be untested).
  assert _agreement(segmenter.predict(img, tta=dict(scales=(1.0,), flip=True)), segmenter.predict(img)) < 1
  # TTA with slide windows: both mechanisms at once.
  crop, stride = (64, 64), (48, 48)
  img = _image((60, 100), seed=40)
  seg = Segmenter(
    segmenter.model, segmenter.variables, dataset='cityscapes', img_scale=SCALE, crop_size=crop, stride=stride
  )
  got = seg.predict(img, tta=dict(scales=(1.0,), flip=True), mode='slide')
  want = _ref_predict(torch_model, img, ratios=(1.0,), flip=True, slide=(crop, stride))
  assert _agreement(got, want) >= 0.999


def test_one_compile_per_bucket(toy_segmenter):
  """50 images of 5 sizes: the model compiles once per input bucket, the
  post-processing once per (bucket, output canvas); repeats compile nothing."""
  seg = Segmenter(
    toy_segmenter.model,
    toy_segmenter.variables,
    dataset='cityscapes',
    img_scale=(128, 64),
    canvas_multiple=128,
    batch_size=4,
  )
  sizes = [(64, 80), (60, 75), (100, 125), (64, 128), (96, 200)]
  # Expected buckets, computed by hand from mmseg's keep-ratio rule:
  # (64,80) (60,75) (100,125) -> 64x80 -> pad 64x96; (64,128) -> 64x128;
  # (96,200) -> f=min(128/200, 64/96) -> 61x128 -> pad 64x128.
  buckets = {(64, 96), (64, 128)}
  canvases = {(hw, (128 * math.ceil(hw[0] / 128), 128 * math.ceil(hw[1] / 128))) for hw in sizes}
  images = [_image(sizes[i % 5], seed=i) for i in range(50)]
  compiles = []
  listener = lambda name, secs, **kw: compiles.append(name) if name.endswith('backend_compile_duration') else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    seg.predict_batch(images)
    first = len(compiles)
    seg.predict_batch(images[::-1])
    assert len(compiles) == first, 'a repeated evaluation compiled again'
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  forward = {k[2:4] for k in seg.traces if k[0] == 'forward'}
  assert forward == buckets
  assert all(n == 1 for n in seg.traces.values()), seg.traces
  pairs = {(b, c) for b in buckets for _, c in canvases}
  assert first <= len(buckets) + len(pairs)


def test_extra_bucket_padding_merges_shapes(segmenter, torch_model):
  """`buckets` / `bucket_multiple` pad beyond mmseg's 32 to merge shapes. Not
  neutral: the head's global pooling sees the extra zeros. With these random
  weights one extra 32-column strip on a 96x128 input keeps 90% of the pixels
  (96x224: 87%, 128x128: 75%), which is why the default pads exactly like
  mmseg (100% agreement with the reference)."""
  seg = Segmenter(
    segmenter.model, segmenter.variables, dataset='cityscapes', img_scale=SCALE, buckets=[(96, 160)], bucket_multiple=64
  )
  assert seg.bucket_for((96, 128)) == (96, 160)
  assert seg.bucket_for((96, 192)) == (128, 192)  # no listed bucket fits: multiple of 64
  img = _image((70, 90), seed=50)  # padded 96x128 -> bucket 96x160
  got = seg.predict(img)
  assert {k[2:4] for k in seg.traces if k[0] == 'forward'} == {(96, 160)}
  assert 0.8 <= _agreement(got, _ref_predict(torch_model, img)) < 1.0


def test_from_checkpoint_formats(checkpoint, segmenter, tmp_path):
  loaded = loader.load(checkpoint)
  loader.save_converted(str(tmp_path / 'converted'), loaded.variables, loaded.model, loaded.num_classes)
  seg = Segmenter.from_checkpoint(str(tmp_path / 'converted'), img_scale=SCALE)
  assert seg.num_classes == K and seg.class_names[0] == 'class_0'  # ADE names do not fit 19 classes
  jax.tree_util.tree_map(np.testing.assert_array_equal, seg.variables, segmenter.variables)
  with pytest.raises(InferenceError, match='variant'):
    Segmenter.from_checkpoint(checkpoint, variant='t')
  with pytest.raises(InferenceError, match='nope.pth'):
    Segmenter.from_checkpoint(str(tmp_path / 'nope.pth'))


def test_bad_input_is_named(segmenter):
  with pytest.raises(InferenceError, match='image 1'):
    segmenter.predict_batch([_image((64, 64), 0), np.zeros((5, 5), np.float32)])
  with pytest.raises(InferenceError, match='tta'):
    segmenter.predict(_image((64, 64), 0), tta=dict(scale=[1.0]))
  # slide windows are the run's config.eval.crop_size / stride: no silent default
  with pytest.raises(InferenceError, match='slide inference needs crop_size and stride'):
    segmenter.predict(_image((64, 64), 0), mode='slide')
  with pytest.raises(InferenceError, match="dataset='nope'.*unknown dataset"):
    Segmenter(segmenter.model, segmenter.variables, dataset='nope')


def test_return_probs_and_confidence_match_the_reference_softmax(segmenter, torch_model):
  img = _image((70, 90), seed=50)
  labels, probs = segmenter.predict(img, return_probs=True)
  assert probs.shape == (70, 90, K) and probs.dtype == np.float32
  want = _ref_probs(torch_model, img, SCALE)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(probs, want, atol=2e-5)
  np.testing.assert_array_equal(labels, probs.argmax(-1))
  # The maps from the reference's logits, in numpy float64.
  with torch.no_grad():
    bgr = _ref_resize(img, SCALE)
    logits = torch_model(_ref_tensor(bgr))[:, :, : bgr.shape[0], : bgr.shape[1]]
    logits = F.interpolate(logits, size=(70, 90), mode='bilinear', align_corners=False)[0].permute(1, 2, 0)
  z = logits.numpy().astype(np.float64)
  log_p = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  max_prob, entropy = confidence_maps(probs)
  np.testing.assert_allclose(max_prob, np.exp(log_p).max(-1), atol=2e-5)
  np.testing.assert_allclose(entropy, -(np.exp(log_p) * log_p).sum(-1), atol=1e-4)
  assert 0 < entropy.min() and entropy.max() <= np.log(K) + 1e-5


def test_return_probs_with_tta_is_the_mean_of_the_views_softmaxes(segmenter, torch_model):
  img = _image((70, 90), seed=51)
  ratios = (0.75, 1.25)
  labels, probs = segmenter.predict(img, tta=dict(scales=ratios, flip=True), return_probs=True)
  views = [_ref_probs(torch_model, img, (int(SCALE[0] * r), int(SCALE[1] * r)), flip=f) for r in ratios for f in (0, 1)]
  want = (sum(views) / len(views))[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(probs, want, atol=2e-5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(labels, segmenter.predict(img, tta=dict(scales=ratios, flip=True)))
