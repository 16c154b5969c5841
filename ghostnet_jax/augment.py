"""Training augmentations of the papers' recipes, host side (numpy / PIL).

Everything here draws its randomness from a ``numpy.random.Generator`` that
the input pipeline derives from ``(seed, position)`` (per image) or
``(seed, step, process)`` (per batch), so a batch stays a pure function of
the seed and the step and a resumed run sees exactly the batches a straight
run sees. Semantics follow timm's training transforms (the recipes of
GhostNetV2/V3 were run with timm):

* :func:`rand_augment` -- RandAugment with timm's config string
  ``rand-m<M>[-n<N>][-mstd<S>][-mmax<X>][-inc<0|1>][-p<P>]``: ``N`` ops drawn
  with replacement from the 15 ops (the "increasing" set with ``inc1``),
  each applied with probability ``P`` (0.5) at a magnitude drawn per op from
  ``Normal(M, S)`` (``S > 100``: ``Uniform(0, M)``) clipped to ``[0, X]``
  (``X = 10``). Signed ops (rotate, shear, translate, increasing enhances)
  flip their sign with probability 1/2. Parsed by
  :func:`parse_rand_augment`.
* :func:`color_jitter` -- torchvision's ``ColorJitter(b, c, s)`` on PIL
  images: brightness, contrast and saturation factors ``U(max(0, 1 - v),
  1 + v)`` applied in a random order (hue is not supported).
* :func:`random_erasing` -- timm's ``RandomErasing(mode='pixel')`` on the
  normalised image: with probability ``p`` one box of area ``U(0.02, 1/3)``
  of the image and log-uniform aspect ratio in ``[0.3, 1/0.3]`` (10 tries to
  fit) is filled with ``Normal(0, 1)`` noise per pixel and channel.
* :func:`mix_batch` -- timm's ``Mixup(mode='batch')``: with probability
  ``mixup_prob`` the whole batch is mixed with its reverse (row ``i`` with
  row ``B - 1 - i``), by CutMix with probability ``switch_prob`` when both
  are on, else by mixup; lambda ~ ``Beta(alpha, alpha)``; CutMix's lambda
  is corrected to the clipped box's area; targets are label-smoothed
  one-hots mixed with the same lambda.

Images are ``(H, W, 3)`` uint8 for the PIL ops, ``(H, W, 3)`` float32
(normalised) for erasing, ``(B, H, W, 3)`` float32 batches for mixing.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# ---------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------

MAGNITUDE_SCALE = 10.0   # magnitudes are on a 0..10 scale
# The op sets RandAugment draws from (timm's default and "increasing" sets).
RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
            'Solarize', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness',
            'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
RAND_OPS_INCREASING = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
    'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
    'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
# Ops whose argument changes sign with probability 1/2.
SIGNED_OPS = frozenset({
    'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
    'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing'})


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed ``rand-...`` string.

  Attributes:
    magnitude: ``M``, mean magnitude on the 0..10 scale.
    num_layers: ``N``, ops applied per image.
    prob: probability each drawn op is applied.
    magnitude_std: ``S``; 0: fixed magnitude; ``inf``: ``Uniform(0, M)``.
    magnitude_max: upper clip of the drawn magnitude.
    increasing: use the ops whose strength increases with the magnitude.
  """
  magnitude: float = 10.0
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0
  magnitude_max: float = MAGNITUDE_SCALE
  increasing: bool = False

  @property
  def ops(self) -> tuple[str, ...]:
    return RAND_OPS_INCREASING if self.increasing else RAND_OPS


def parse_rand_augment(config_str: str) -> RandAugmentSpec:
  """``'rand-m9-mstd0.5-inc1'`` -> :class:`RandAugmentSpec`.

  Sections after ``rand`` in any order: ``m<int>``, ``n<int>``,
  ``mstd<float>`` (``> 100`` means uniform), ``mmax<int>``, ``inc<0|1>``,
  ``p<float>``.

  Raises:
    ValueError: not a ``rand-`` string, an unknown or malformed section, or
      values out of range.
  """
  if not isinstance(config_str, str) or not config_str.startswith('rand'):
    raise ValueError(f'expected a RandAugment string like "rand-m9-mstd0.5", '
                     f'got {config_str!r}.')
  parts = config_str.split('-')
  if parts[0] != 'rand':
    raise ValueError(f'{config_str!r} must start with "rand-".')
  fields = {}
  for part in parts[1:]:
    match = re.fullmatch(r'(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)', part)
    if match is None:
      raise ValueError(f'cannot parse section {part!r} of {config_str!r}; '
                       'sections are m<int>, n<int>, mstd<float>, mmax<int>, '
                       'inc<0|1>, p<float>.')
    key, value = match.groups()
    fields[key] = value
  try:
    spec = RandAugmentSpec(
        magnitude=float(int(fields.get('m', '10'))),
        num_layers=int(fields.get('n', '2')),
        prob=float(fields.get('p', '0.5')),
        magnitude_std=float(fields.get('mstd', '0')),
        magnitude_max=float(int(fields.get('mmax', '10'))),
        increasing=bool(int(fields.get('inc', '0'))))
  except ValueError:
    raise ValueError(f'cannot parse {config_str!r}: m, n, mmax and inc take '
                     'integers.') from None
  if spec.magnitude_std > 100:
    spec = dataclasses.replace(spec, magnitude_std=math.inf)
  if spec.num_layers < 1 or not 0 < spec.prob <= 1 or \
      fields.get('inc', '0') not in ('0', '1'):
    raise ValueError(f'{config_str!r}: need n >= 1, 0 < p <= 1, inc 0 or 1.')
  return spec


def _signed(value: float, negate: bool) -> float:
  return -value if negate else value


def op_argument(name: str, magnitude: float, negate: bool = False, *,
                translate_pct: float = 0.45):
  """The argument an op takes at ``magnitude`` (0..10); None if it has none.

  Angles in degrees (max 30), shear factor (max 0.3), translation as a
  fraction of the side (max ``translate_pct``), enhance factors in
  [0.1, 1.9], posterize bits, solarize thresholds, solarize-add offsets.
  """
  level = magnitude / MAGNITUDE_SCALE
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return None
  if name == 'Rotate':
    return _signed(level * 30.0, negate)
  if name in ('ShearX', 'ShearY'):
    return _signed(level * 0.3, negate)
  if name in ('TranslateXRel', 'TranslateYRel'):
    return _signed(level * translate_pct, negate)
  if name == 'Posterize':
    return int(level * 4)
  if name == 'PosterizeIncreasing':
    return 4 - int(level * 4)
  if name == 'Solarize':
    return min(256, int(level * 256))
  if name == 'SolarizeIncreasing':
    return 256 - min(256, int(level * 256))
  if name == 'SolarizeAdd':
    return min(128, int(level * 110))
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return level * 1.8 + 0.1
  if name in ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
              'SharpnessIncreasing'):
    return max(0.1, 1.0 + _signed(level * 0.9, negate))
  raise ValueError(f'Unknown RandAugment op {name!r}.')


_ENHANCERS = {'Color': ImageEnhance.Color, 'Contrast': ImageEnhance.Contrast,
              'Brightness': ImageEnhance.Brightness,
              'Sharpness': ImageEnhance.Sharpness}


def _affine(image: Image.Image, coeffs, fill, resample) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, coeffs,
                         resample=resample, fillcolor=fill)


def apply_op(image: Image.Image, name: str, arg, *,
             fill: tuple[int, int, int] = (128, 128, 128),
             resample=Image.Resampling.BILINEAR) -> Image.Image:
  """One RandAugment op on an RGB PIL image with its argument ``arg``.

  Geometric ops fill uncovered pixels with ``fill`` and resample with
  ``resample``.
  """
  base = name.replace('Increasing', '')
  if base == 'AutoContrast':
    return ImageOps.autocontrast(image)
  if base == 'Equalize':
    return ImageOps.equalize(image)
  if base == 'Invert':
    return ImageOps.invert(image)
  if base == 'Rotate':
    return image.rotate(arg, resample=resample, fillcolor=fill)
  if base == 'ShearX':
    return _affine(image, (1, arg, 0, 0, 1, 0), fill, resample)
  if base == 'ShearY':
    return _affine(image, (1, 0, 0, arg, 1, 0), fill, resample)
  if base == 'TranslateXRel':
    return _affine(image, (1, 0, arg * image.size[0], 0, 1, 0), fill, resample)
  if base == 'TranslateYRel':
    return _affine(image, (1, 0, 0, 0, 1, arg * image.size[1]), fill, resample)
  if base == 'Posterize':
    if arg <= 0:  # keep no bit: black (Pillow >= 11 refuses bits=0)
      return Image.new(image.mode, image.size)
    return image if arg >= 8 else ImageOps.posterize(image, arg)
  if base == 'Solarize':
    return ImageOps.solarize(image, arg)
  if base == 'SolarizeAdd':
    table = [min(255, v + arg) if v < 128 else v for v in range(256)]
    return image.point(table * len(image.getbands()))
  if base in _ENHANCERS:
    return _ENHANCERS[base](image).enhance(arg)
  raise ValueError(f'Unknown RandAugment op {name!r}.')


def rand_augment(image: np.ndarray, rng: np.random.Generator,
                 spec: RandAugmentSpec, *,
                 fill: tuple[int, int, int] = (128, 128, 128),
                 resample=Image.Resampling.BILINEAR,
                 translate_pct: float = 0.45) -> np.ndarray:
  """RandAugment of one ``(H, W, 3)`` uint8 image; same shape and dtype out.

  ``spec.num_layers`` ops drawn with replacement, each applied with
  probability ``spec.prob`` at its own drawn magnitude and sign.
  """
  ops = spec.ops
  chosen = rng.integers(0, len(ops), size=spec.num_layers)
  pil = Image.fromarray(image)
  for index in chosen:
    if spec.prob < 1.0 and rng.random() > spec.prob:
      continue
    magnitude = spec.magnitude
    if spec.magnitude_std == math.inf:
      magnitude = rng.uniform(0.0, magnitude)
    elif spec.magnitude_std > 0:
      magnitude = rng.normal(magnitude, spec.magnitude_std)
    magnitude = min(max(magnitude, 0.0), spec.magnitude_max)
    name = ops[int(index)]
    negate = bool(rng.random() > 0.5) if name in SIGNED_OPS else False
    arg = op_argument(name, magnitude, negate, translate_pct=translate_pct)
    pil = apply_op(pil, name, arg, fill=fill, resample=resample)
  return np.asarray(pil)


# ---------------------------------------------------------------------------
# Colour jitter
# ---------------------------------------------------------------------------

def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 strength: Sequence[float]) -> np.ndarray:
  """torchvision ``ColorJitter(brightness, contrast, saturation)`` on PIL.

  Args:
    image: ``(H, W, 3)`` uint8.
    rng: generator for the order and the factors.
    strength: ``(b, c, s)``; each factor is ``U(max(0, 1 - v), 1 + v)``,
      skipped when ``v == 0``.

  Returns:
    ``(H, W, 3)`` uint8.
  """
  enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast,
               ImageEnhance.Color)
  pil = Image.fromarray(image)
  for i in rng.permutation(3):
    v = float(strength[i])
    if v > 0:
      pil = enhancers[i](pil).enhance(rng.uniform(max(0.0, 1 - v), 1 + v))
  return np.asarray(pil)


# ---------------------------------------------------------------------------
# Random erasing (per-pixel mode)
# ---------------------------------------------------------------------------

def erasing_box(height: int, width: int, rng: np.random.Generator, *,
                min_area: float = 0.02, max_area: float = 1 / 3,
                min_aspect: float = 0.3) -> tuple[int, int, int, int] | None:
  """``(top, left, h, w)`` of an erased box, or None after 10 misses."""
  log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
  area = height * width
  for _ in range(10):
    target = rng.uniform(min_area, max_area) * area
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return None


def random_erasing(image: np.ndarray, rng: np.random.Generator,
                   prob: float) -> np.ndarray:
  """timm ``RandomErasing(prob, mode='pixel')`` of a normalised image.

  ``(H, W, C)`` float32 in; the same array (erased in place) out.
  """
  if prob <= 0 or rng.random() > prob:
    return image
  box = erasing_box(image.shape[0], image.shape[1], rng)
  if box is not None:
    top, left, h, w = box
    image[top:top + h, left:left + w] = rng.standard_normal(
        (h, w, image.shape[2]), dtype=np.float32)
  return image


# ---------------------------------------------------------------------------
# Mixup / CutMix (per batch)
# ---------------------------------------------------------------------------

def smooth_one_hot(labels: np.ndarray, num_classes: int,
                   smoothing: float) -> np.ndarray:
  """``(B,)`` int -> ``(B, num_classes)`` float32: ``1 - s + s / K`` / ``s / K``."""
  off = smoothing / num_classes
  out = np.full((len(labels), num_classes), off, np.float32)
  out[np.arange(len(labels)), labels] = 1.0 - smoothing + off
  return out


def cutmix_box(height: int, width: int, lam: float,
               rng: np.random.Generator) -> tuple[int, int, int, int]:
  """``(y0, y1, x0, x1)`` of a box of side ``sqrt(1 - lam)`` of the image,
  centred uniformly and clipped to the image."""
  ratio = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  cy = int(rng.integers(0, height))
  cx = int(rng.integers(0, width))
  y0 = min(max(cy - cut_h // 2, 0), height)
  y1 = min(max(cy + (cut_h + 1) // 2, 0), height)
  x0 = min(max(cx - cut_w // 2, 0), width)
  x1 = min(max(cx + (cut_w + 1) // 2, 0), width)
  return y0, y1, x0, x1


def apply_mix(images: np.ndarray, targets: np.ndarray, lam: float,
              box: tuple[int, int, int, int] | None = None,
              perm: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, float]:
  """Mixes a batch with ``images[perm]`` (default: the reversed batch).

  Args:
    images: ``(B, H, W, C)`` float32.
    targets: ``(B, K)`` float32 (one-hot, possibly smoothed).
    lam: weight of the original rows.
    box: CutMix box ``(y0, y1, x0, x1)`` pasted from the partner rows; the
      lambda then becomes ``1 - box area / image area``. None: mixup.
    perm: partner row of each row.

  Returns:
    ``(mixed images, mixed targets, lambda used)``.
  """
  perm = np.arange(len(images))[::-1] if perm is None else np.asarray(perm)
  if box is not None:
    y0, y1, x0, x1 = box
    images = images.copy()
    images[:, y0:y1, x0:x1] = images[perm, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(images.shape[1] * images.shape[2])
  elif lam != 1.0:
    images = images * np.float32(lam) + images[perm] * np.float32(1.0 - lam)
  targets = targets * np.float32(lam) + targets[perm] * np.float32(1.0 - lam)
  return images.astype(np.float32, copy=False), targets, lam


@dataclasses.dataclass(frozen=True)
class MixSpec:
  """Mixup / CutMix of a batch (timm ``Mixup(mode='batch')``)."""
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.0
  num_classes: int = 1000

  @property
  def enabled(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def mix_params(rng: np.random.Generator, spec: MixSpec) -> tuple[float, bool]:
  """``(lambda, use_cutmix)`` of one batch; lambda 1 means unmixed."""
  if not spec.enabled or rng.random() >= spec.prob:
    return 1.0, False
  if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
    use_cutmix = bool(rng.random() < spec.switch_prob)
  else:
    use_cutmix = spec.cutmix_alpha > 0
  alpha = spec.cutmix_alpha if use_cutmix else spec.mixup_alpha
  return float(rng.beta(alpha, alpha)), use_cutmix


def mix_batch(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              spec: MixSpec) -> tuple[np.ndarray, np.ndarray]:
  """Mixup / CutMix of a ``(B, H, W, C)`` batch with int labels ``(B,)``.

  Returns:
    ``(images, targets)``: float32 ``(B, H, W, C)`` and ``(B, K)``.
  """
  targets = smooth_one_hot(labels, spec.num_classes, spec.label_smoothing)
  lam, use_cutmix = mix_params(rng, spec)
  if lam == 1.0:
    return images, targets
  box = cutmix_box(images.shape[1], images.shape[2], lam, rng) \
      if use_cutmix else None
  images, targets, _ = apply_mix(images, targets, lam, box)
  return images, targets


# ---------------------------------------------------------------------------
# Pipeline configuration
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augment:
  """The augmentations of one run, as the input pipeline applies them.

  Per image, after crop and flip: RandAugment (if set; timm then skips colour
  jitter), else colour jitter (if set); after normalisation: random erasing.
  Per batch: mixup / CutMix (``mix``).
  """
  rand_augment: RandAugmentSpec | None = None
  color_jitter: tuple[float, float, float] | None = None
  erasing_prob: float = 0.0
  fill: tuple[int, int, int] = (128, 128, 128)
  resample: int = int(Image.Resampling.BILINEAR)
  translate_pct: float = 0.45
  mix: MixSpec | None = None

  def image_ops(self, image: np.ndarray, rng: np.random.Generator
                ) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8, after crop and flip."""
    if self.rand_augment is not None:
      return rand_augment(image, rng, self.rand_augment, fill=self.fill,
                          resample=Image.Resampling(self.resample),
                          translate_pct=self.translate_pct)
    if self.color_jitter is not None:
      return color_jitter(image, rng, self.color_jitter)
    return image

  def erase(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 normalised ``(H, W, 3)`` -> erased (in place)."""
    return random_erasing(image, rng, self.erasing_prob)


@dataclasses.dataclass(frozen=True)
class BatchMix:
  """grain ``random_map`` over local batches: adds the soft ``'target'``."""
  spec: MixSpec

  def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
    images, targets = mix_batch(batch['image'], batch['label'], rng, self.spec)
    return {**batch, 'image': images, 'target': targets}


def from_config(config, num_classes: int, mean: Sequence[float],
                interpolation: str = 'bilinear') -> Augment | None:
  """The :class:`Augment` of a trainer config; None when all are off.

  Fields (absent ones are off): ``rand_augment`` (string, '' off),
  ``color_jitter`` (float or 3 floats, 0 off), ``random_erasing``
  (probability), ``mixup`` / ``cutmix`` (Beta alphas, 0 off),
  ``mixup_prob``, ``mixup_switch_prob``; ``label_smoothing`` goes into the
  mixed targets.

  Raises:
    ValueError: naming the field.
  """
  get = config.get
  ra = None
  if get('rand_augment', ''):
    try:
      ra = parse_rand_augment(get('rand_augment'))
    except ValueError as e:
      raise ValueError(f'config.rand_augment: {e}') from None
  cj = color_jitter_strength(get('color_jitter', 0.0))
  values = {}
  for name, default, hi in (('random_erasing', 0.0, 1.0), ('mixup', 0.0, None),
                            ('cutmix', 0.0, None), ('mixup_prob', 1.0, 1.0),
                            ('mixup_switch_prob', 0.5, 1.0)):
    v = get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or \
        (hi is not None and v > hi):
      want = f'in [0, {hi}]' if hi is not None else '>= 0 (a Beta alpha)'
      raise ValueError(f'config.{name} must be a number {want}; got {v!r}.')
    values[name] = float(v)
  mix = MixSpec(mixup_alpha=values['mixup'], cutmix_alpha=values['cutmix'],
                prob=values['mixup_prob'],
                switch_prob=values['mixup_switch_prob'],
                label_smoothing=float(get('label_smoothing', 0.0)),
                num_classes=int(num_classes))
  mix = mix if mix.enabled and mix.prob > 0 else None
  erasing = values['random_erasing']
  if ra is None and cj is None and erasing == 0 and mix is None:
    return None
  resample = {'nearest': Image.Resampling.NEAREST,
              'bicubic': Image.Resampling.BICUBIC}.get(
                  interpolation, Image.Resampling.BILINEAR)
  fill = tuple(min(255, round(255 * m)) for m in mean)
  return Augment(rand_augment=ra, color_jitter=cj, erasing_prob=erasing,
                 fill=fill, resample=int(resample), mix=mix)


def check_config(config) -> None:
  """Validates the augmentation fields without data (see :func:`from_config`).

  Raises:
    ValueError: naming the field.
  """
  from_config(config, 2, (0.5, 0.5, 0.5), 'bilinear')


def color_jitter_strength(value) -> tuple[float, float, float] | None:
  """``config.color_jitter`` (float or 3 floats) -> ``(b, c, s)`` or None."""
  try:
    vals = (float(value),) * 3 if np.ndim(value) == 0 else \
        tuple(float(v) for v in value)
  except (TypeError, ValueError):
    vals = ()
  if len(vals) != 3 or min(vals) < 0:
    raise ValueError(f'config.color_jitter must be a float >= 0 or 3 of them '
                     f'(brightness, contrast, saturation); got {value!r}.')
  return None if max(vals) == 0 else vals

