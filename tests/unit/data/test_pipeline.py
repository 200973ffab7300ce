"""Train / eval pipelines: determinism, resume, sharding, buckets, global
batches and on-device normalisation."""

import functools
import os
import subprocess
import sys
import textwrap

import cv2
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgrseg_jax.data import pipeline as dp
import mmcv_ops
from cgrseg_jax.data import datasets, sources
from cgrseg_jax.data import transforms as T
from cgrseg_jax.data.synthetic import SyntheticSegmentation

from paths import REPO

# Small and fast: 40x56 scenes, 32x32 crops.
SMALL = dict(crop_size=(32, 32), img_scale=(80, 40), read_threads=1)


def _synthetic(n=12, classes=5, size=(40, 56), seed=0, split='train'):
  return SyntheticSegmentation(num_samples=n, num_classes=classes, image_size=size, seed=seed, split=split)


def _train(n=12, **kw):
  args = dict(SMALL, batch_size=2, seed=0, shard_index=0, shard_count=1)
  args.update(kw)
  return dp.make_train_dataset('synthetic', source=_synthetic(n), **args)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------- train basics


def test_train_batch_layout():
  batch = next(iter(_train(batch_size=3)))
  assert batch['image'].shape == (3, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (3, 32, 32) and batch['label'].dtype == np.uint8
  assert batch['valid_hw'].shape == (3, 2) and batch['valid_hw'].dtype == np.int32
  assert batch['index'].dtype == np.int32
  for img, lbl, (h, w) in zip(batch['image'], batch['label'], batch['valid_hw']):
    assert (img[h:] == 0).all() and (img[:, w:] == 0).all()
    assert (lbl[h:] == 255).all() and (lbl[:, w:] == 255).all()


def test_same_seed_same_batches_different_seed_different():
  a = _take(iter(_train(seed=3)), 8)
  b = _take(iter(_train(seed=3)), 8)
  _assert_batches_equal(a, b)
  c = _take(iter(_train(seed=4)), 8)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  assert [x['index'].tolist() for x in a] != [x['index'].tolist() for x in c]


def test_epochs_are_reshuffled_and_augmented_afresh():
  batches = _take(iter(_train(n=8, batch_size=2)), 8)  # two epochs
  order = np.concatenate([b['index'] for b in batches])
  assert sorted(order[:8]) == list(range(8)) and sorted(order[8:]) == list(range(8))
  assert order[:8].tolist() != order[8:].tolist()


def test_random_draws_drive_image_and_label_together():
  # Without photometric distortion every crop/flip of the image must match
  # the same crop/flip of the label: recolour the label and compare.
  src = _synthetic(n=6, classes=5)
  ds = dp.make_train_dataset(
    'synthetic',
    source=src,
    batch_size=1,
    seed=1,
    shard_index=0,
    shard_count=1,
    photometric=False,
    crop_size=(32, 32),
    img_scale=(56, 40),
    ratio_range=(1.0, 1.0),
    read_threads=1,
  )
  for batch in _take(iter(ds), 6):
    i = int(batch['index'][0])
    ref = src[i]
    img, lbl = batch['image'][0], batch['label'][0]
    found = False
    for flip in (False, True):
      rimg = ref['image'][:, ::-1] if flip else ref['image']
      rlbl = ref['label'][:, ::-1] if flip else ref['label']
      for y in range(40 - 32 + 1):
        for x in range(56 - 32 + 1):
          if np.array_equal(rimg[y : y + 32, x : x + 32], img):
            np.testing.assert_array_equal(rlbl[y : y + 32, x : x + 32], lbl)
            found = True
    assert found


def test_ade20k_directory_pipeline_with_workers(tmp_path):
  root = str(tmp_path / 'ADEChallengeData2016')
  syn = _synthetic(n=8, classes=6)
  syn.write_ade20k_layout(root, split_dir='training')
  ds = dp.make_train_dataset(
    'ade20k',
    root=root,
    batch_size=2,
    num_epochs=1,
    num_workers=2,
    shard_index=0,
    shard_count=1,
    crop_size=(32, 32),
    img_scale=(80, 40),
  )
  batches = list(ds)
  assert sorted(np.concatenate([b['index'] for b in batches]).tolist()) == list(range(8))
  for b in batches:
    # stored ids 1..6 come back as 0..5 after reduce_zero_label; 255 = padding
    assert set(np.unique(b['label']).tolist()) <= set(range(6)) | {255}
  # A corrupt file read in a worker process surfaces here, naming the file.
  bad = os.path.join(root, 'images', 'training', 'synthetic_train_00000005.jpg')
  open(bad, 'wb').write(b'not a jpeg')
  ds = dp.make_train_dataset(
    'ade20k',
    root=root,
    batch_size=2,
    num_epochs=1,
    num_workers=2,
    shard_index=0,
    shard_count=1,
    crop_size=(32, 32),
    img_scale=(80, 40),
  )
  with pytest.raises(sources.DataError, match='synthetic_train_00000005.jpg: not a decodable image'):
    list(ds)


# --------------------------------------------------------------- resume


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_equals_uninterrupted_run(workers):
  # Restores from every step of a finite run and compares everything after.
  ds = _train(n=8, batch_size=2, num_epochs=1, num_workers=workers)
  grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_iterator_state_round_trips_through_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  it = iter(_train(n=10, batch_size=2, seed=7))
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.save(
      3,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave({'step': np.array(3, np.int32)}), data=grain.checkpoint.CheckpointSave(it)
      ),
    )
    mngr.wait_until_finished()
    expected = _take(it, 4)  # what the uninterrupted run produces next
    fresh = iter(_train(n=10, batch_size=2, seed=7))
    restored = mngr.restore(
      3,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore({'step': np.array(0, np.int32)}), data=grain.checkpoint.CheckpointRestore(fresh)
      ),
    )
  assert int(restored['state']['step']) == 3
  _assert_batches_equal(_take(fresh, 4), expected)


# ------------------------------------------------------------- sharding


def test_process_shards_cover_an_epoch_exactly_once():
  n, procs, bs = 12, 2, 2
  shards = []
  for p in range(procs):
    ds = _train(n=n, batch_size=bs, num_epochs=1, shard_index=p, shard_count=procs)
    shards.append(np.concatenate([b['index'] for b in ds]))
  assert len(shards[0]) == len(shards[1]) == n // procs
  assert sorted(np.concatenate(shards).tolist()) == list(range(n))
  # Processes augment differently: shard seeds differ.
  a = next(iter(_train(n=n, shard_index=0, shard_count=2)))
  b = next(iter(_train(n=n, shard_index=1, shard_count=2)))
  assert not np.array_equal(a['index'], b['index'])


def test_uneven_shards_drop_the_same_tail_everywhere():
  n, procs = 11, 3
  shards = [
    np.concatenate([b['index'] for b in _train(n=n, batch_size=1, num_epochs=1, shard_index=p, shard_count=procs)])
    for p in range(procs)
  ]
  assert [len(s) for s in shards] == [3, 3, 3]
  union = np.concatenate(shards)
  assert len(set(union.tolist())) == 9  # disjoint, 11 % 3 = 2 dropped this epoch


def test_too_small_dataset_for_batch_is_an_error():
  with pytest.raises(ValueError, match='fewer than the batch size'):
    _train(n=3, batch_size=2, shard_count=2)


# ------------------------------------------------------------------ eval


class _VariedSource:
  """In-memory source with varied sizes (what ADE20K val looks like)."""

  def __init__(self, sizes, seed=0):
    rng = np.random.default_rng(seed)
    self.records = []
    for i, (h, w) in enumerate(sizes):
      self.records.append(
        {
          'image': rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
          'label': rng.integers(0, 6, size=(h, w), dtype=np.uint8),
          'index': i,
        }
      )

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[int(i)]

  def size(self, i):
    return self.records[int(i)]['label'].shape


_INFO = datasets.DatasetInfo('varied', 5, True, img_scale=(256, 64), crop_size=(64, 64))


def _varied(n=17, seed=0):
  rng = np.random.default_rng(seed)
  return _VariedSource([tuple(int(v) for v in rng.integers(30, 200, size=2)) for _ in range(n)], seed)


def test_eval_content_matches_mmseg_test_pipeline():
  src = _varied()
  ev = dp.make_eval_dataset(
    'varied', source=src, info=_INFO, batch_size=2, max_buckets=None, shard_index=0, shard_count=1, read_threads=1
  )
  seen = []
  for batch in ev:
    for k in range(2):
      i = int(batch['index'][k])
      if i < 0:
        assert (batch['label'][k] == 255).all() and (batch['valid_hw'][k] == 0).all()
        continue
      seen.append(i)
      ref = src[i]
      h0, w0 = ref['label'].shape
      (h, w), _ = T.rescale_size((h0, w0), (256, 64))
      np.testing.assert_array_equal(batch['valid_hw'][k], [h, w])
      np.testing.assert_array_equal(batch['orig_hw'][k], [h0, w0])
      resized = cv2.resize(ref['image'], (w, h), interpolation=cv2.INTER_LINEAR)
      np.testing.assert_array_equal(batch['image'][k, :h, :w], resized)
      assert (batch['image'][k, h:] == 0).all() and (batch['image'][k, :, w:] == 0).all()
      # exact mmseg padding: to the next multiple of 32
      assert batch['image'].shape[1:3] == tuple(int(np.ceil(v / 32) * 32) for v in (h, w))
      np.testing.assert_array_equal(batch['label'][k, :h0, :w0], T.reduce_zero_label(ref['label']))
      assert (batch['label'][k, h0:] == 255).all() and (batch['label'][k, :, w0:] == 255).all()
  assert sorted(seen) == list(range(len(src)))


def test_eval_buckets_bound_the_number_of_shapes():
  src = _varied(n=60, seed=1)
  ev = dp.make_eval_dataset(
    'varied', source=src, info=_INFO, batch_size=1, max_buckets=4, shard_index=0, shard_count=1, read_threads=1
  )
  shapes = set()
  for batch in ev:
    shapes.add((batch['image'].shape, batch['label'].shape))
    h, w = batch['valid_hw'][0]
    assert batch['image'].shape[1] >= h and batch['image'].shape[2] >= w
  assert len(shapes) <= 4 and len(ev.shapes) <= 4
  exact = dp.make_eval_dataset('varied', source=src, info=_INFO, max_buckets=None, shard_index=0, shard_count=1)
  assert len(exact.shapes) > 4  # the bound did something


def test_eval_shards_see_every_sample_once_in_lockstep():
  src = _varied(n=23, seed=2)
  runs = [
    dp.make_eval_dataset(
      'varied', source=src, info=_INFO, batch_size=2, max_buckets=3, shard_index=p, shard_count=2, read_threads=1
    )
    for p in range(2)
  ]
  assert runs[0].num_batches == runs[1].num_batches
  per_proc = [[b for b in r] for r in runs]
  for b0, b1 in zip(*per_proc):  # same shapes step by step, as global batches need
    assert b0['image'].shape == b1['image'].shape and b0['label'].shape == b1['label'].shape
  indices = np.concatenate([b['index'] for run in per_proc for b in run])
  real = indices[indices >= 0]
  assert sorted(real.tolist()) == list(range(23))
  # `indices` (what the TTA / slide evaluator reads) are the same images, in batch order
  for run, batches in zip(runs, per_proc):
    assert run.indices == [int(i) for b in batches for i in b['index'] if i >= 0]
  assert sorted(runs[0].indices + runs[1].indices) == list(range(23))


def test_eval_synthetic_default_and_worker_processes():
  ev = dp.make_eval_dataset(
    'synthetic',
    batch_size=2,
    num_workers=2,
    shard_index=0,
    shard_count=1,
    source_kwargs=dict(num_samples=5, image_size=(40, 50), num_classes=4),
  )
  indices = np.concatenate([b['index'] for b in ev])
  assert sorted(indices[indices >= 0].tolist()) == list(range(5))


# ----------------------------------------------------- device-side parts


def test_normalize_image_matches_mmseg_and_zeroes_padding():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(3, 10, 12, 3), dtype=np.uint8)
  valid = np.array([[10, 12], [4, 7], [0, 0]], np.int32)
  out = np.asarray(jax.jit(dp.normalize_image)(image, valid))
  ref = (image[..., ::-1].astype(np.float64) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
  np.testing.assert_allclose(out[0], ref[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[1, :4, :7], ref[1, :4, :7], atol=1e-5, rtol=0)
  assert (out[1, 4:] == 0).all() and (out[1, :, 7:] == 0).all() and (out[2] == 0).all()
  # mmseg normalises and then pads with 0: compare on a padded sample.
  padded = T.Pad((10, 12)).map({'image': image[1, :4, :7], 'label': np.zeros((4, 7), np.uint8)})
  mmseg = np.pad(mmcv_ops.normalize_transform(image[1, :4, :7]), ((0, 6), (0, 5), (0, 0)))
  np.testing.assert_allclose(
    np.asarray(dp.normalize_image(padded['image'][None], padded['valid_hw'][None]))[0], mmseg, atol=1e-5, rtol=0
  )
  rgb = np.asarray(dp.normalize_image(image[..., ::-1], bgr_to_rgb=False))
  np.testing.assert_allclose(rgb, ref, atol=1e-5, rtol=0)
  assert dp.normalize_image(jnp.asarray(image), dtype=jnp.bfloat16).dtype == jnp.bfloat16


# 'tpu': the accelerator form (compare-and-select summed), here computed by the CPU's IEEE
# float32 arithmetic, which a TPU or GPU also uses for these adds of zeros.
@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_normalize_image_is_bit_exact_with_mmcv_on_all_values(platform):
  # channel c of pixel k holds (k + 85 c) % 256: every uint8 value in every channel
  k = np.arange(256).reshape(16, 16, 1)
  image = ((k + 85 * np.arange(3)) % 256).astype(np.uint8)
  ref = mmcv_ops.normalize_transform(image)  # mmseg's Normalize, as its pipeline calls it
  normalize = functools.partial(dp.normalize_image, platform=platform)
  out = np.asarray(jax.jit(normalize)(image[None], np.array([[16, 16]], np.int32)))[0]
  np.testing.assert_array_equal(out, ref)
  # Padding stays exactly 0, the inside is unchanged.
  padded = np.asarray(normalize(image[None], np.array([[9, 5]], np.int32)))[0]
  np.testing.assert_array_equal(padded[:9, :5], ref[:9, :5])
  assert not padded[9:].any() and not padded[:, 5:].any()
  assert np.signbit(padded[9:]).sum() == 0  # +0.0, as mmseg's zero padding


def test_global_batch_on_single_process_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  local = {'image': np.ones((2, 4, 4, 3), np.uint8), 'label': np.zeros((2, 4, 4), np.uint8)}
  out = dp.make_global_batch(local, mesh)
  assert out['image'].shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(np.asarray(out['image']), local['image'])
  with pytest.raises(ValueError, match="no 'data' axis"):
    dp.make_global_batch(local, jax.sharding.Mesh(np.array(jax.devices()[:1]), ('model',)))


def test_global_batch_sharded_over_8_devices_subprocess():
  code = textwrap.dedent("""
        import numpy as np, jax
        from cgrseg_jax.data import pipeline as dp
        assert jax.device_count() == 8, jax.devices()
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        it = dp.make_train_iterator("synthetic", batch_size=8, crop_size=(32, 32), img_scale=(80, 40),
                                    read_threads=1, source_kwargs=dict(num_samples=16, image_size=(40, 56)))
        local = next(it)
        batch = dp.make_global_batch(local, mesh)
        img = batch["image"]
        assert img.shape == (8, 32, 32, 3) and img.dtype == np.uint8
        assert img.sharding.spec == jax.sharding.PartitionSpec("data")
        assert len({str(s.index) for s in img.addressable_shards}) == 4  # 4 row blocks, replicated over "model"
        for s in img.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), local["image"][s.index])
        x = jax.jit(dp.normalize_image)(img, batch["valid_hw"])
        assert x.shape == (8, 32, 32, 3) and x.sharding.spec[0] == "data"
        bad = {k: v[:6] for k, v in local.items()}
        try:
            dp.make_global_batch(bad, mesh)
        except ValueError as e:
            assert "global batch size 6" in str(e) and "4 devices" in str(e), e
        else:
            raise AssertionError("no error for a batch of 6 over 4 devices")
        print("OK")
    """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  res = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and 'OK' in res.stdout, res.stderr[-3000:]


def test_synthetic_default_honours_num_classes_and_checks_mismatch(tmp_path):
  it = dp.make_train_iterator(
    num_classes=4,
    batch_size=2,
    crop_size=(32, 32),
    img_scale=(80, 40),
    shard_index=0,
    shard_count=1,
    read_threads=1,
    source_kwargs=dict(num_samples=6, image_size=(40, 56)),
  )
  labels = np.concatenate([next(it)['label'].ravel() for _ in range(3)])
  assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 255}
  root = str(tmp_path / 'ADE')
  _synthetic(n=2).write_ade20k_layout(root)
  with pytest.raises(ValueError, match="num_classes=19 but dataset 'ade20k' has 150"):
    dp.make_train_dataset('ade20k', root=root, num_classes=19, batch_size=1)
