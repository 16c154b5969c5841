"""ghostnet_jax.augment against timm's implementations on the same images.

* every RandAugment op at magnitudes 0..10 and both signs vs timm's
  ``AugmentOp`` (prob 1, fixed magnitude, timm's sign draw pinned): max pixel
  difference 0 (both end in the same PIL calls; the test guards the
  magnitude -> argument mapping and the op wiring);
* the RandAugment string parser vs timm's ``rand_augment_transform``;
* mixup / CutMix exactly vs timm's ``Mixup`` given the same lambda, box
  and (reversed-batch) permutation;
* random-erasing box area / aspect statistics vs timm's ``RandomErasing``
  (two-sample KS tests over 4000 draws each);
* the pipeline: augmented batches are a function of (seed, step), also
  after resume, and the default (no augmentation) batches are unchanged.
"""

import math
import random

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from ghostnet_jax import augment as aug
from ghostnet_jax import input_pipeline as ip


@pytest.fixture(scope='module')
def image():
  from skimage import data
  # A 64x96 crop of chelsea: small, textured, not square.
  return np.ascontiguousarray(data.chelsea()[100:164, 150:246])


HP = {'translate_const': 100, 'img_mean': (124, 116, 104),
      'interpolation': Image.Resampling.BILINEAR}


@pytest.mark.parametrize('increasing', [False, True])
def test_rand_augment_ops_match_timm(timm, image, increasing, monkeypatch):
  from timm.data import auto_augment as taa
  ops = aug.RAND_OPS_INCREASING if increasing else aug.RAND_OPS
  assert set(ops) == set(taa._RAND_INCREASING_TRANSFORMS if increasing
                         else taa._RAND_TRANSFORMS)
  pil = Image.fromarray(image)
  worst = {}
  for name in ops:
    for negate in (False, True):
      monkeypatch.setattr(taa, '_randomly_negate',
                          (lambda v: -v) if negate else (lambda v: v))
      for magnitude in (0, 3, 5, 9, 10):
        arg = aug.op_argument(name, magnitude, negate)
        ours = np.asarray(aug.apply_op(pil, name, arg, fill=HP['img_mean'],
                                       resample=HP['interpolation']))
        op = taa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=HP)
        if name.startswith('Posterize') and arg == 0:
          # timm asks Pillow for 0 bits, which Pillow >= 11 refuses (older
          # Pillow returned black): we return black.
          with pytest.raises(ValueError, match='bits'):
            op(pil)
          assert not ours.any()
          continue
        ref = np.asarray(op(pil))
        diff = int(np.abs(ours.astype(int) - ref.astype(int)).max())
        worst[name] = max(worst.get(name, 0), diff)
  assert worst == {name: 0 for name in ops}, worst


def test_rand_augment_ops_change_the_image(image):
  """Guards against a no-op passing the comparison: at magnitude 9 every
  op but the level-free ones at this image changes pixels."""
  pil = Image.fromarray(image)
  for name in aug.RAND_OPS:
    out = np.asarray(aug.apply_op(pil, name, aug.op_argument(name, 9)))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image), name


@pytest.mark.parametrize('text', ['rand-m9-mstd0.5', 'rand-m9-mstd0.5-inc1',
                                  'rand-m7-n3-mstd1.0-mmax12-p0.7',
                                  'rand-m10-mstd101'])
def test_parse_rand_augment_matches_timm(timm, text):
  from timm.data import auto_augment as taa
  ref = taa.rand_augment_transform(text, dict(HP))
  spec = aug.parse_rand_augment(text)
  assert spec.num_layers == ref.num_layers
  assert [op.name for op in ref.ops] == list(spec.ops)
  op = ref.ops[0]
  assert (spec.magnitude, spec.prob) == (op.magnitude, op.prob)
  assert spec.magnitude_std == op.magnitude_std
  assert spec.magnitude_max == (op.magnitude_max or 10)


@pytest.mark.parametrize('bad', ['rand-x9', 'rand-m9-mstd', 'randm9', 'rnd-m9',
                                 'rand-m9.5', 'rand-n0', 'rand-inc2', ''])
def test_parse_rand_augment_rejects(bad):
  with pytest.raises(ValueError):
    aug.parse_rand_augment(bad)


def test_rand_augment_deterministic_and_varied(image):
  spec = aug.parse_rand_augment('rand-m9-mstd0.5')
  a = aug.rand_augment(image, np.random.default_rng(5), spec)
  b = aug.rand_augment(image, np.random.default_rng(5), spec)
  np.testing.assert_array_equal(a, b)
  outs = [aug.rand_augment(image, np.random.default_rng(s), spec)
          for s in range(8)]
  assert len({o.tobytes() for o in outs}) >= 6


def test_color_jitter_ops_match_timm_enhancers(timm, image):
  """Each factor goes through the same op as timm's (torchvision's PIL
  ColorJitter uses the same PIL enhancers): compare with rng pinned to one
  active op at a time."""
  from timm.data import auto_augment as taa
  pil = Image.fromarray(image)
  refs = (taa.brightness, taa.contrast, taa.color)
  for i, ref in enumerate(refs):
    strength = [0.0, 0.0, 0.0]
    strength[i] = 0.4
    rng = np.random.default_rng(1)
    out = aug.color_jitter(image, rng, strength)
    rng = np.random.default_rng(1)
    rng.permutation(3)
    factor = rng.uniform(0.6, 1.4)
    assert 0.6 <= factor <= 1.4
    np.testing.assert_array_equal(out, np.asarray(ref(pil, factor)))
  assert aug.color_jitter_strength(0.0) is None
  assert aug.color_jitter_strength(0.4) == (0.4, 0.4, 0.4)
  for bad in ('x', -0.1, (0.1, 0.2)):
    with pytest.raises(ValueError, match='config.color_jitter'):
      aug.color_jitter_strength(bad)


# ---------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('mode', ['mixup', 'cutmix'])
def test_mix_matches_timm_exactly(timm, mode):
  import torch
  from timm.data import mixup as tmix
  rs = np.random.RandomState(0)
  b, h, w, k = 6, 12, 10, 7
  images = rs.standard_normal((b, h, w, 3)).astype(np.float32)
  labels = rs.randint(0, k, b)
  kw = dict(mixup_alpha=0.8 if mode == 'mixup' else 0.0,
            cutmix_alpha=1.0 if mode == 'cutmix' else 0.0,
            prob=1.0, switch_prob=0.5, mode='batch', label_smoothing=0.1,
            num_classes=k)
  m = tmix.Mixup(**kw)
  np.random.seed(3)
  x_ref, y_ref = m(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                   torch.from_numpy(labels))
  # Replay timm's draws: lambda (and box) with the same global numpy seed.
  np.random.seed(3)
  lam, use_cutmix = m._params_per_batch()
  box = None
  if use_cutmix:
    (y0, y1, x0, x1), _ = tmix.cutmix_bbox_and_lam(
        (b, 3, h, w), lam, correct_lam=True)
    box = (int(y0), int(y1), int(x0), int(x1))
  assert use_cutmix == (mode == 'cutmix') and lam != 1.0
  targets = aug.smooth_one_hot(labels, k, 0.1)
  x, y, lam_used = aug.apply_mix(images, targets, lam, box)
  np.testing.assert_allclose(x, x_ref.numpy().transpose(0, 2, 3, 1),
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(y, y_ref.numpy(), rtol=0, atol=1e-6)
  if mode == 'cutmix':
    assert lam_used == pytest.approx(
        1 - (box[1] - box[0]) * (box[3] - box[2]) / (h * w))
    assert not np.array_equal(x, images)


def test_cutmix_box_matches_timm_rand_bbox_distribution(timm):
  """Our box draw (generator) vs timm's rand_bbox (global numpy): the same
  box sizes for a lambda, the same set of positions."""
  from timm.data import mixup as tmix
  rng = np.random.default_rng(0)
  np.random.seed(0)
  for lam in (0.3, 0.55, 0.9):
    ours = {aug.cutmix_box(12, 10, lam, rng) for _ in range(3000)}
    ref = {tuple(int(v) for v in tmix.rand_bbox((1, 3, 12, 10), lam))
           for _ in range(3000)}
    assert ours == ref


def test_mix_params_switch_and_prob():
  spec = aug.MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6,
                     switch_prob=0.25, num_classes=5)
  rng = np.random.default_rng(0)
  draws = [aug.mix_params(rng, spec) for _ in range(20000)]
  mixed = [d for d in draws if d[0] != 1.0]
  assert len(mixed) / len(draws) == pytest.approx(0.6, abs=0.015)
  assert np.mean([c for _, c in mixed]) == pytest.approx(0.25, abs=0.015)
  # Beta(0.8, 0.8) mean 1/2, variance 1/4/(2.6) for mixup.
  lams = np.array([lam for lam, c in mixed if not c])
  assert lams.var() == pytest.approx(0.25 / 2.6, abs=0.01)


# ---------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------

def _erased_boxes(erase, n, h=40, w=56):
  areas, aspects = [], []
  for _ in range(n):
    x = np.full((h, w, 3), 100.0, np.float32)
    x = erase(x)
    hit = np.argwhere((x != 100.0).any(-1))
    if len(hit):
      bh = hit[:, 0].max() - hit[:, 0].min() + 1
      bw = hit[:, 1].max() - hit[:, 1].min() + 1
      areas.append(bh * bw / (h * w))
      aspects.append(math.log(bh / bw))
  return np.array(areas), np.array(aspects)


def test_random_erasing_statistics_match_timm(timm):
  import torch
  from scipy import stats
  from timm.data.random_erasing import RandomErasing
  n = 4000
  ref = RandomErasing(probability=0.6, mode='pixel', device='cpu')
  random.seed(0)
  torch.manual_seed(0)

  def timm_erase(x):
    t = torch.from_numpy(x.transpose(2, 0, 1).copy())
    return ref(t).numpy().transpose(1, 2, 0)

  rng = np.random.default_rng(0)
  ref_area, ref_aspect = _erased_boxes(timm_erase, n)
  area, aspect = _erased_boxes(lambda x: aug.random_erasing(x, rng, 0.6), n)
  assert len(area) / n == pytest.approx(0.6, abs=0.03)
  assert len(ref_area) / n == pytest.approx(0.6, abs=0.03)
  assert stats.ks_2samp(area, ref_area).pvalue > 1e-3
  assert stats.ks_2samp(aspect, ref_aspect).pvalue > 1e-3
  assert 0.02 * 0.9 <= area.min() and area.max() <= 1 / 3 * 1.1
  # Erased pixels are N(0, 1) noise, per pixel and channel.
  x = aug.random_erasing(np.full((40, 56, 3), 100.0, np.float32),
                         np.random.default_rng(1), 1.0)
  noise = x[x != 100.0]
  assert abs(noise.mean()) < 0.15 and abs(noise.std() - 1) < 0.1


# ---------------------------------------------------------------------------
# In the pipeline
# ---------------------------------------------------------------------------

N_MOCK = 13


@pytest.fixture
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=N_MOCK,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _augment(**kw):
  from ml_collections import ConfigDict
  c = ConfigDict(dict(rand_augment='rand-m9-mstd0.5', color_jitter=0.4,
                      random_erasing=0.5, mixup=0.8, cutmix=1.0,
                      mixup_prob=1.0, mixup_switch_prob=0.5,
                      label_smoothing=0.1))
  c.update(kw)
  return aug.from_config(c, 1000, (0.5, 0.5, 0.5))


def _train(**kw):
  args = dict(dataset='imagenet2012', data_dir=None, global_batch_size=8,
              image_size=16, seed=3, process_index=0, process_count=1,
              mean=(0.5,) * 3, std=(0.5,) * 3, with_index=True)
  args.update(kw)
  return ip.train_iterator(**args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_augmented_batches_are_a_function_of_seed_and_step(mock_imagenet):
  a = _augment()
  straight = _take(_train(augment=a), 5)
  again = _take(_train(augment=a), 5)
  resumed = _take(_train(augment=a, start_step=3), 2)
  for x, y in zip(straight, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for x, y in zip(straight[3:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert straight[0]['target'].shape == (8, 1000)
  np.testing.assert_allclose(straight[0]['target'].sum(-1), 1.0, atol=1e-5)
  plain = _take(_train(), 5)
  # Same examples, other pixels.
  for x, y in zip(straight, plain):
    np.testing.assert_array_equal(x['index'], y['index'])
    assert not np.array_equal(x['image'], y['image'])
  other = _take(_train(augment=a, seed=4), 1)[0]
  assert not np.array_equal(other['image'], straight[0]['image'])


def test_two_processes_mix_their_own_rows(mock_imagenet):
  a = _augment(rand_augment='', color_jitter=0.0, random_erasing=0.0)
  p0 = _take(_train(augment=a, process_index=0, process_count=2), 2)
  p1 = _take(_train(augment=a, process_index=1, process_count=2), 2)
  full = _take(_train(augment=None), 2)
  for s in range(2):
    np.testing.assert_array_equal(
        np.concatenate([p0[s]['index'], p1[s]['index']]), full[s]['index'])
    assert p0[s]['image'].shape == (4, 16, 16, 3)


def test_from_config_off_and_errors():
  assert _augment(rand_augment='', color_jitter=0.0, random_erasing=0.0,
                  mixup=0.0, cutmix=0.0) is None
  with pytest.raises(ValueError, match='config.rand_augment'):
    _augment(rand_augment='rand-m9-foo')
  with pytest.raises(ValueError, match='config.random_erasing'):
    _augment(random_erasing=1.5)
  with pytest.raises(ValueError, match='config.mixup_prob'):
    _augment(mixup_prob=2.0)
  with pytest.raises(ValueError, match='config.cutmix'):
    _augment(cutmix=-1.0)


def test_imagenet_configs_turn_on_their_papers_augmentations():
  import importlib
  got = {}
  for name in ('ghostnet_100_imagenet', 'ghostnetv2_100_imagenet',
               'ghostnetv3_100_imagenet', 'g_ghost_regnetx_032_imagenet'):
    c = importlib.import_module(f'configs.{name}').get_config()
    a = aug.from_config(c, 1000, (0.485, 0.456, 0.406), c.interpolation)
    got[name] = None if a is None else (
        a.rand_augment, a.color_jitter, a.erasing_prob, a.mix)
  ra = aug.parse_rand_augment('rand-m9-mstd0.5')
  assert got == {
      'ghostnet_100_imagenet': (None, (0.4, 0.4, 0.4), 0.0, None),
      'ghostnetv2_100_imagenet': (ra, None, 0.2, None),
      'ghostnetv3_100_imagenet': (ra, None, 0.2, None),
      'g_ghost_regnetx_032_imagenet': None}
