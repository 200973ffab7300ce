"""Test-time shape buckets and the split of evaluation images over processes
(data/buckets.py), against answers worked out by hand."""

from cgrseg_jax.data import buckets


def test_bucket_for_takes_the_smallest_listed_bucket_that_fits_else_rounds_up():
  listed = [(128, 128), (96, 160), (64, 64)]
  assert buckets.bucket_for((64, 64), 32, listed) == (64, 64)
  assert buckets.bucket_for((96, 128), 32, listed) == (96, 160)  # 15360 px < 128x128's 16384
  assert buckets.bucket_for((96, 192), 64, listed) == (128, 192)  # none fits: a multiple of 64
  assert buckets.bucket_for((33, 65), 32) == (64, 96)


def test_plan_multiple_doubles_until_the_shapes_are_few_enough():
  sizes = [((32, 32),), ((64, 64),), ((96, 96),), ((128, 128),)]
  assert buckets.plan_multiple(sizes, 32, None) == 32  # no limit: mmseg's padding
  assert buckets.plan_multiple(sizes, 32, 4) == 32
  assert buckets.plan_multiple(sizes, 32, 2) == 64  # 64, 64, 128, 128
  assert buckets.plan_multiple(sizes, 32, 1) == 128


def test_plan_buckets_rounds_image_and_label_to_the_same_multiple():
  # (100, 150) at img_scale (64, 48): f = min(64/150, 48/100) = 0.4267 -> 43x64 -> image bucket 64x64
  (pair,) = buckets.plan_buckets([(100, 150)], (64, 48), size_divisor=32, max_buckets=None)
  assert pair == ((64, 64), (128, 160))


def test_plan_eval_batches_splits_every_image_once_in_global_batches():
  keys = ['b', 'a', 'b', 'a', 'a', 'b', 'b']  # group a: 1, 3, 4; group b: 0, 2, 5, 6
  p0 = buckets.plan_eval_batches(keys, batch_size=1, shard_index=0, shard_count=2)
  p1 = buckets.plan_eval_batches(keys, batch_size=1, shard_index=1, shard_count=2)
  assert p0 == [('a', (1,)), ('a', (4,)), ('b', (0,)), ('b', (5,))]
  assert p1 == [('a', (3,)), ('a', (-1,)), ('b', (2,)), ('b', (6,))]  # -1: the filler of a short batch
  single = buckets.plan_eval_batches(keys, batch_size=2, shard_index=0, shard_count=1)
  assert single == [('a', (1, 3)), ('a', (4, -1)), ('b', (0, 2)), ('b', (5, 6))]
