"""Tests of the input pipeline and the bundled digits dataset.

tfds is mocked with ``tfds.testing.mock_data`` (data sources only, so no
TensorFlow): ``imagenet2012`` then serves 13 random examples of random sizes
in every split. The digits dataset is really built (about 2 s) once per
session.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image

from ghostnet_jax import input_pipeline as ip
from ghostnet_jax.datasets import digits

N_MOCK = 13  # Not divisible by the batch sizes below.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def chelsea():
  from skimage import data
  return data.chelsea()  # (300, 451, 3) uint8


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_preprocess_eval_matches_independent_reference(chelsea, interpolation):
  assert chelsea.shape == (300, 451, 3)
  out = ip.preprocess_eval(chelsea, 224, 0.875, interpolation,
                           ip.IMAGENET_MEAN, ip.IMAGENET_STD)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  # Hand-computed geometry: shorter side 300 -> 256, longer side
  # int(256 * 451 / 300) = int(384.85) = 384; crop offsets (256-224)/2 = 16
  # and (384-224)/2 = 80. Resampled by torch's antialiased interpolation,
  # which is built to match PIL up to rounding.
  t = torch.from_numpy(chelsea).permute(2, 0, 1)[None].double()
  resized = torch.nn.functional.interpolate(
      t, size=(256, 384), mode=interpolation, antialias=True,
      align_corners=False).round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
  mean, std = np.array(ip.IMAGENET_MEAN), np.array(ip.IMAGENET_STD)

  def levels_off(top, left):
    ref = (resized[top:top + 224, left:left + 224] / 255.0 - mean) / std
    return np.abs(out - ref) * std * 255.0

  diff = levels_off(16, 80)
  assert diff.max() <= 1.0 + 1e-3  # At most one uint8 level (rounding).
  assert diff.mean() < 0.3
  # A crop one pixel off is far worse: the comparison can tell.
  assert levels_off(17, 80).mean() > 3.0 and levels_off(16, 81).mean() > 3.0


@pytest.mark.parametrize('shape,expected', [
    ((300, 451), (256, 384)),   # Long side truncated: 384.85 -> 384.
    ((451, 300), (384, 256)),
    ((100, 100), (256, 256)),
    ((512, 1024), (256, 512)),
])
def test_resize_shorter_side_follows_torchvision(shape, expected):
  image = np.zeros(shape + (3,), np.uint8)
  assert ip.resize_shorter_side(image, 256).shape == expected + (3,)


def test_center_crop_offsets_round_like_torchvision():
  h, w = 7, 8
  image = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing='ij'),
                   -1).astype(np.uint8)
  # (7 - 2) / 2 = 2.5 rounds to 2 (half to even); (8 - 2) / 2 = 3.
  out = ip.center_crop(image, 2)
  assert out[0, 0].tolist() == [2, 3]
  out = ip.center_crop(image[:6], 3)   # (6 - 3) / 2 = 1.5 rounds to 2.
  assert out[0, 0].tolist() == [2, 2]
  with pytest.raises(ValueError, match='Cannot center crop'):
    ip.center_crop(image, 8)


def test_eval_resize_size():
  assert ip.eval_resize_size(224, 0.875) == 256
  assert ip.eval_resize_size(32, 1.0) == 32
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match='crop_fraction'):
      ip.eval_resize_size(224, bad)


def test_to_rgb_grey_rgba_and_bad_shapes(rng):
  grey = rng.randint(0, 256, (5, 6)).astype(np.uint8)
  for g in (grey, grey[:, :, None]):
    out = ip.to_rgb(g)
    assert out.shape == (5, 6, 3)
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, 2))
  rgba = rng.randint(0, 256, (5, 6, 4)).astype(np.uint8)
  np.testing.assert_array_equal(ip.to_rgb(rgba), rgba[:, :, :3])
  np.testing.assert_array_equal(
      ip.to_rgb(rgba), np.asarray(Image.fromarray(rgba, 'RGBA').convert('RGB')))
  for shape in [(5, 6, 2), (5, 6, 5), (2, 5, 6, 3), (5,), (0, 6, 3)]:
    with pytest.raises(ValueError, match=r'shape \(' + ', '.join(map(str, shape))):
      ip.to_rgb(np.zeros(shape, np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    ip.to_rgb(np.zeros((5, 6, 3), np.float32))


@pytest.mark.parametrize('channels', [None, 1, 4])
def test_preprocess_converts_grey_and_rgba(rng, channels):
  shape = (40, 30) if channels is None else (40, 30, channels)
  image = rng.randint(0, 256, shape).astype(np.uint8)
  rgb = ip.to_rgb(image)
  out = ip.preprocess_eval(image, 16, 0.875, 'bilinear', MEAN, STD)
  np.testing.assert_array_equal(
      out, ip.preprocess_eval(rgb, 16, 0.875, 'bilinear', MEAN, STD))
  gen = lambda: np.random.default_rng(3)
  out = ip.preprocess_train(image, gen(), 16, mean=MEAN, std=STD)
  assert out.shape == (16, 16, 3)
  np.testing.assert_array_equal(
      out, ip.preprocess_train(rgb, gen(), 16, mean=MEAN, std=STD))
  with pytest.raises(ValueError, match=r'\(40, 30, 2\)'):
    ip.preprocess_eval(np.zeros((40, 30, 2), np.uint8), 16)


def test_normalize_matches_formula(rng):
  image = rng.randint(0, 256, (9, 7, 3)).astype(np.uint8)
  out = ip.normalize(image, MEAN, STD)
  ref = (image / 255.0 - np.array(MEAN)) / np.array(STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match='3 values'):
    ip.normalize(image, (0.5, 0.5), STD)
  with pytest.raises(ValueError, match='positive'):
    ip.normalize(image, MEAN, (0.5, 0.0, 0.5))


def test_random_resized_crop_size_range_and_determinism(chelsea):
  outs = [ip.random_resized_crop(chelsea, np.random.default_rng(s), 64)
          for s in range(6)]
  for out in outs:
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(
      outs[0], ip.random_resized_crop(chelsea, np.random.default_rng(0), 64))
  assert not np.array_equal(outs[0], outs[1])
  x = ip.preprocess_train(chelsea, np.random.default_rng(0), 64, mean=MEAN,
                          std=STD)
  lo = (0.0 - np.array(MEAN)) / np.array(STD)
  hi = (1.0 - np.array(MEAN)) / np.array(STD)
  assert x.dtype == np.float32
  assert np.all(x >= lo - 1e-6) and np.all(x <= hi + 1e-6)


def test_random_resized_crop_takes_an_exact_window():
  # Pixel (r, c) holds (r, c, 7); a 50x50 box resized to 50x50 is the window
  # itself, whose first pixel names its offset.
  rows, cols = np.meshgrid(np.arange(100), np.arange(100), indexing='ij')
  image = np.stack([rows, cols, np.full((100, 100), 7)], -1).astype(np.uint8)
  offsets = set()
  for s in range(20):
    out = ip.random_resized_crop(image, np.random.default_rng(s), 50,
                                 scale=(0.25, 0.25), ratio=(1.0, 1.0),
                                 interpolation='nearest')
    top, left = int(out[0, 0, 0]), int(out[0, 0, 1])
    assert 0 <= top <= 50 and 0 <= left <= 50
    np.testing.assert_array_equal(out, image[top:top + 50, left:left + 50])
    offsets.add((top, left))
  assert len(offsets) > 10


@pytest.mark.parametrize('shape,window', [
    ((40, 100), (0, 30, 40, 40)),   # Too wide for ratio 1: center square.
    ((100, 40), (30, 0, 40, 40)),   # Too tall.
])
def test_random_resized_crop_falls_back_to_center(shape, window):
  # scale (1, 1) at ratio 1 never fits a non-square image: all 10 tries miss.
  top, left, h, w = ip.random_resized_crop_box(
      *shape, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
  assert (top, left, h, w) == window
  image = np.random.default_rng(1).integers(0, 256, shape + (3,), np.uint8)
  out = ip.random_resized_crop(image, np.random.default_rng(0), 40,
                               scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_array_equal(out, image[top:top + h, left:left + w])


def test_random_resized_crop_box_respects_scale_and_ratio():
  gen = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(300):
    top, left, h, w = ip.random_resized_crop_box(1000, 1000, gen)
    assert 0 <= top <= 1000 - h and 0 <= left <= 1000 - w
    areas.append(h * w / 1e6)
    ratios.append(w / h)
  assert 0.08 - 1e-3 <= min(areas) and max(areas) <= 1.0
  assert 3 / 4 - 1e-2 <= min(ratios) and max(ratios) <= 4 / 3 + 1e-2
  assert max(areas) - min(areas) > 0.5  # Actually spread over the range.


def test_preprocess_train_flips_half_the_time(rng):
  image = rng.randint(0, 256, (24, 24, 3)).astype(np.uint8)
  plain = ip.normalize(image, MEAN, STD)
  flipped = ip.normalize(image[:, ::-1], MEAN, STD)
  seen = {True: 0, False: 0}
  for s in range(40):
    out = ip.preprocess_train(image, np.random.default_rng(s), 24,
                              scale=(1.0, 1.0), ratio=(1.0, 1.0), mean=MEAN,
                              std=STD)
    is_flipped = np.array_equal(out, flipped)
    assert is_flipped or np.array_equal(out, plain)
    seen[is_flipped] += 1
    if s < 10:  # hflip=False never flips.
      out = ip.preprocess_train(image, np.random.default_rng(s), 24,
                                scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                hflip=False, mean=MEAN, std=STD)
      np.testing.assert_array_equal(out, plain)
  assert seen[True] >= 8 and seen[False] >= 8


def test_preprocess_bad_arguments(chelsea):
  gen = np.random.default_rng(0)
  with pytest.raises(ValueError, match='interpolation'):
    ip.preprocess_eval(chelsea, 32, interpolation='cubic')
  with pytest.raises(ValueError, match='scale'):
    ip.random_resized_crop(chelsea, gen, 32, scale=(0.5, 0.1))
  with pytest.raises(ValueError, match='ratio'):
    ip.random_resized_crop(chelsea, gen, 32, ratio=(0.0, 1.0))
  with pytest.raises(ValueError, match='image_size'):
    ip.preprocess_eval(chelsea, 0)


# ---------------------------------------------------------------------------
# Pipeline on mocked imagenet2012
# ---------------------------------------------------------------------------

@pytest.fixture
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=N_MOCK,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _train(**kw):
  args = dict(dataset='imagenet2012', data_dir=None, global_batch_size=8,
              image_size=16, seed=3, process_index=0, process_count=1,
              mean=MEAN, std=STD, with_index=True)
  args.update(kw)
  return ip.train_iterator(**args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_dataset_info_of_mocked_imagenet(mock_imagenet):
  info = ip.get_dataset_info('imagenet2012', None)
  assert info.num_classes == 1000
  assert info.image_key == 'image' and info.label_key == 'label'
  assert info.class_names[:2] == ('n01440764', 'n01443537')
  assert info.splits['train'] == N_MOCK and info.splits['validation'] == N_MOCK
  assert info.eval_split == 'validation'
  with pytest.raises(ValueError, match="no ClassLabel feature 'file_name'"):
    ip.get_dataset_info('imagenet2012', None, label_key='file_name')
  with pytest.raises(ValueError, match="no Image feature 'label'"):
    ip.get_dataset_info('imagenet2012', None, image_key='label')


def test_train_batch_shapes(mock_imagenet):
  batch = next(_train(with_index=False))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (8, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert np.all((batch['label'] >= 0) & (batch['label'] < 1000))
  with pytest.raises(TypeError, match='infinite'):
    len(_train())


def test_train_is_a_function_of_seed_and_step(mock_imagenet):
  straight = _take(_train(), 6)
  _assert_batches_equal(straight, _take(_train(), 6))
  _assert_batches_equal(straight[4:], _take(_train(start_step=4), 2))
  _assert_batches_equal(straight[1:2], _take(_train(start_step=1), 1))
  for a, b in zip(straight, straight[1:]):
    assert not np.array_equal(a['image'], b['image'])
  other = _take(_train(seed=4), 2)
  assert not np.array_equal(other[0]['index'], straight[0]['index'])
  assert not np.array_equal(other[0]['image'], straight[0]['image'])


def test_train_epochs_are_permutations_reshuffled(mock_imagenet):
  # One epoch per step: every batch is a permutation of the split.
  batches = _take(_train(global_batch_size=N_MOCK), 4)
  orders = [b['index'].tolist() for b in batches]
  for order in orders:
    assert sorted(order) == list(range(N_MOCK))
  assert len({tuple(o) for o in orders}) == 4


def test_train_same_example_gets_new_augmentation_each_epoch(mock_imagenet):
  a, b = _take(_train(global_batch_size=N_MOCK), 2)
  i = 0
  j = int(np.flatnonzero(b['index'] == a['index'][i])[0])
  assert not np.array_equal(a['image'][i], b['image'][j])


def test_train_processes_split_the_global_batch(mock_imagenet):
  whole = _take(_train(), 3)
  parts = [_take(_train(process_index=i, process_count=2), 3) for i in (0, 1)]
  # Step 0 lies inside epoch 0, so its halves hold distinct examples (later
  # steps straddle epochs, where an example may legitimately recur).
  assert not set(parts[0][0]['index'].tolist()) & set(parts[1][0]['index'].tolist())
  for step in range(3):
    p0, p1 = parts[0][step], parts[1][step]
    assert p0['image'].shape == (4, 16, 16, 3)
    for k in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([p0[k], p1[k]]), whole[step][k])
  resumed = _take(_train(process_index=1, process_count=2, start_step=2), 1)
  _assert_batches_equal(resumed, parts[1][2:])


def test_eval_counts_every_example_once(mock_imagenet):
  kw = dict(dataset='imagenet2012', data_dir=None, split='validation',
            image_size=16, mean=MEAN, std=STD, with_index=True)
  single = list(ip.eval_iterator(global_batch_size=5, process_index=0,
                                 process_count=1, **kw))
  assert len(single) == 3  # ceil(13 / 5)
  assert sum(b['mask'].sum() for b in single) == N_MOCK
  # Two processes, global batch 4: 4 steps each, 16 rows, 3 of them padding.
  iters = [ip.eval_iterator(global_batch_size=4, process_index=i,
                            process_count=2, **kw) for i in (0, 1)]
  n = ip.num_eval_batches(dataset='imagenet2012', data_dir=None,
                          split='validation', global_batch_size=4)
  assert n == 4 and [len(it) for it in iters] == [4, 4]
  seen, masked = [], 0.0
  for it in iters:
    batches = list(it)
    assert len(batches) == 4
    for b in batches:
      assert b['image'].shape == (2, 16, 16, 3) and b['mask'].shape == (2,)
      assert b['label'].dtype == np.int32
      real = b['mask'] > 0
      seen += b['index'][real].tolist()
      masked += float(b['mask'].sum())
      assert np.all(b['index'][~real] == -1)
      assert np.all(b['image'][~real] == 0)
  assert masked == N_MOCK
  assert sorted(seen) == list(range(N_MOCK))  # Each exactly once.


def test_eval_rows_are_preprocess_eval_of_the_source(mock_imagenet):
  source = tfds.data_source('imagenet2012', split='validation')
  batch = next(ip.eval_iterator(
      dataset='imagenet2012', data_dir=None, split='validation',
      global_batch_size=4, image_size=16, crop_fraction=0.875,
      interpolation='bicubic', mean=MEAN, std=STD, process_index=0,
      process_count=1, with_index=True))
  for row, i in enumerate(batch['index']):
    example = source[int(i)]
    np.testing.assert_array_equal(
        batch['image'][row],
        ip.preprocess_eval(example['image'], 16, 0.875, 'bicubic', MEAN, STD))
    assert batch['label'][row] == example['label']


def test_iterator_argument_errors(mock_imagenet):
  with pytest.raises(ValueError, match='not divisible by process_count 3'):
    _train(global_batch_size=8, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='process_index'):
    _train(process_index=2, process_count=2)
  with pytest.raises(ValueError, match='seed'):
    _train(seed=-1)
  with pytest.raises(ValueError, match='start_step'):
    _train(start_step=-2)
  with pytest.raises(ValueError, match='global_batch_size'):
    ip.num_eval_batches(dataset='imagenet2012', data_dir=None,
                        split='validation', global_batch_size=0)


def test_process_defaults_come_from_jax(mock_imagenet):
  batch = next(_train(process_index=None, process_count=None))
  assert batch['image'].shape[0] == 8  # One process: the whole batch.


def test_unknown_and_unprepared_datasets(tmp_path):
  with pytest.raises(ValueError, match="Unknown tfds dataset 'imagenet2013'.*imagenet2012"):
    ip.get_dataset_info('imagenet2013', str(tmp_path))
  with pytest.raises(ValueError) as e:
    ip.get_dataset_info('imagenet2012', str(tmp_path))
  msg = str(e.value)
  assert 'not prepared' in msg and str(tmp_path / 'imagenet2012') in msg
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in msg
  assert 'ILSVRC2012_img_train.tar' in msg and '--file_format array_record' in msg
  with pytest.raises(ValueError, match='prepare_digits'):
    ip.train_iterator(dataset='ghostnet_digits', data_dir=str(tmp_path),
                      global_batch_size=4, image_size=8, seed=0,
                      process_index=0, process_count=1)


# ---------------------------------------------------------------------------
# The digits dataset
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  info = ip.get_dataset_info(digits.prepare_digits(data_dir), data_dir)
  return data_dir, info


def test_digits_split_indices_stratified_and_deterministic():
  labels = np.repeat(np.arange(3), [10, 21, 7])
  split = digits.digits_split_indices(labels)
  assert not set(split['train']) & set(split['test'])
  assert sorted(np.concatenate([split['train'], split['test']])) == list(range(38))
  assert np.bincount(labels[split['test']]).tolist() == [2, 4, 1]
  again = digits.digits_split_indices(labels)
  np.testing.assert_array_equal(split['test'], again['test'])
  other = digits.digits_split_indices(labels, seed=1)
  assert not np.array_equal(split['test'], other['test'])
  with pytest.raises(ValueError, match='test_fraction'):
    digits.digits_split_indices(labels, test_fraction=1.0)


def test_digits_dataset_contents(digits_dir):
  from sklearn.datasets import load_digits
  data_dir, info = digits_dir
  assert info.name == 'ghostnet_digits/32'
  assert info.splits == {'train': 1438, 'test': 359}
  assert info.num_classes == 10
  assert info.class_names == tuple(str(d) for d in range(10))
  assert info.image_shape == (32, 32, 3) and info.eval_split == 'test'
  sk = load_digits()
  counts = np.bincount(sk.target, minlength=10)
  seen = {}
  for split in ('train', 'test'):
    source = tfds.data_source(info.name, split=split, data_dir=data_dir)
    for k in range(len(source)):
      ex = source[k]
      i = int(ex['index'])
      assert i not in seen
      seen[i] = split
      assert int(ex['label']) == sk.target[i]
      image = ex['image']
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8
      if k < 20:  # The image is the upsampled digit: grey, same strokes.
        assert np.array_equal(image[..., 0], image[..., 1])
        small = image[..., 0].reshape(8, 4, 8, 4).mean((1, 3))
        assert np.corrcoef(small.ravel(), sk.images[i].ravel())[0, 1] > 0.9
  assert sorted(seen) == list(range(1797))
  test_counts = np.bincount(
      [sk.target[i] for i, s in seen.items() if s == 'test'], minlength=10)
  np.testing.assert_array_equal(test_counts, np.round(0.2 * counts))


def test_prepare_digits_is_a_no_op_when_built(digits_dir):
  data_dir, info = digits_dir
  marker = os.path.join(data_dir, 'ghostnet_digits', '32', '1.0.0',
                        'dataset_info.json')
  before = os.stat(marker).st_mtime_ns
  assert digits.prepare_digits(data_dir) == info.name == 'ghostnet_digits/32'
  assert os.stat(marker).st_mtime_ns == before
  with pytest.raises(ValueError, match='available sizes'):
    digits.prepare_digits(data_dir, image_size=48)


def test_digits_through_the_iterators(digits_dir):
  data_dir, info = digits_dir
  it = ip.train_iterator(dataset=info.name, data_dir=data_dir,
                         global_batch_size=32, image_size=32, seed=0,
                         scale=(0.35, 1.0), mean=MEAN, std=STD,
                         process_index=0, process_count=1)
  batch = next(it)
  assert batch['image'].shape == (32, 32, 32, 3)
  assert np.all((batch['label'] >= 0) & (batch['label'] < 10))
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    ip.eval_iterator(dataset=info.name, data_dir=data_dir, split='validation',
                     global_batch_size=100, image_size=32)
  ev = ip.eval_iterator(dataset=info.name, data_dir=data_dir, split='test',
                        global_batch_size=100, image_size=32,
                        crop_fraction=1.0, mean=MEAN, std=STD,
                        process_index=0, process_count=1, with_index=True)
  assert len(ev) == 4
  batches = list(ev)
  index = np.concatenate([b['index'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 359 and sorted(index[mask > 0]) == list(range(359))
  # crop_fraction 1 at the stored size: the stored pixels, normalised.
  source = tfds.data_source(info.name, split='test', data_dir=data_dir)
  np.testing.assert_array_equal(
      batches[0]['image'][5], ip.normalize(source[5]['image'], MEAN, STD))
  assert batches[0]['label'][5] == source[5]['label']


def test_digits_batches_keep_labels_with_their_images(digits_dir):
  # A linear classifier fitted on augmented train batches must recognise the
  # test split: it cannot if rows and labels were mismatched anywhere.
  from sklearn.linear_model import LogisticRegression
  data_dir, info = digits_dir
  pool = lambda b: b['image'][..., 0].reshape(-1, 8, 4, 8, 4).mean((2, 4)).reshape(-1, 64)
  it = ip.train_iterator(dataset=info.name, data_dir=data_dir,
                         global_batch_size=128, image_size=32, seed=0,
                         scale=(0.5, 1.0), hflip=False, mean=MEAN, std=STD,
                         process_index=0, process_count=1)
  train = _take(it, 5)
  test = list(ip.eval_iterator(dataset=info.name, data_dir=data_dir,
                               split='test', global_batch_size=128,
                               image_size=32, crop_fraction=1.0, mean=MEAN,
                               std=STD, process_index=0, process_count=1))
  real = np.concatenate([b['mask'] for b in test]) > 0
  x_test = np.concatenate([pool(b) for b in test])[real]
  y_test = np.concatenate([b['label'] for b in test])[real]
  clf = LogisticRegression(max_iter=500).fit(
      np.concatenate([pool(b) for b in train]),
      np.concatenate([b['label'] for b in train]))
  assert np.mean(clf.predict(x_test) == y_test) > 0.8  # Chance: 0.1.


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(digits_dir):
  data_dir, info = digits_dir
  kw = dict(dataset=info.name, data_dir=data_dir, global_batch_size=16,
            image_size=32, seed=5, start_step=3, process_index=0,
            process_count=1, with_index=True)
  _assert_batches_equal(_take(ip.train_iterator(**kw), 3),
                        _take(ip.train_iterator(worker_count=2, **kw), 3))


def test_no_tensorflow_needed(digits_dir):
  data_dir, info = digits_dir
  code = (
      'import sys\n'
      'from ghostnet_jax import input_pipeline as ip\n'
      f'it = ip.eval_iterator(dataset={info.name!r}, data_dir={data_dir!r}, '
      "split='test', global_batch_size=8, image_size=32, process_index=0, "
      'process_count=1)\n'
      'next(it)\n'
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], cwd=root, check=True,
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
