"""Semantic segmentation on a GhostNet backbone: a template for research code.

A DeepLabV3+-style head on ``create_model(..., features_only=True,
output_stride=16)``, trained end to end on per-pixel digit masks::

  python examples/segmentation.py                       # the README's run
  python examples/segmentation.py --steps 30 --eval-every 10   # a smoke run

The task is built from the handwritten digits scikit-learn bundles (the one
image data set available offline): each 64x64 scene holds 1-3 digits, each
8x8 digit upsampled to 24x24 and pasted at a random place (later digits on
top); every pixel of a stroke (intensity > 1/4) is labelled with its digit
(classes 1-10), everything else is background (class 0). Train scenes use the
``train`` digits of :func:`ghostnet_jax.datasets.digits.digits_split_indices`,
test scenes the ``test`` digits, so the test mIoU is on unseen handwriting.

What to reuse:

* the backbone: ``create_model(name, features_only=True, out_indices=...,
  output_stride=16)`` returns NHWC maps; :func:`ghostnet_jax.feature_info`
  tells the head their channels and strides without running anything;
* ImageNet (or any classification) weights:
  ``--torch-checkpoint file.pth`` converts a PyTorch checkpoint and
  :func:`ghostnet_jax.transfer_variables` keeps only what the backbone uses
  (strict: a wrong file fails with the names that do not fit);
* the sharded step: :mod:`ghostnet_jax.sharding` places the batch over every
  device (``('data', 'fsdp')`` mesh) and replicates the state; the step is one
  ``jax.jit``;
* the optimiser: :func:`ghostnet_jax.optim.make_schedule` (cosine with
  warmup) and optax's AdamW with :func:`ghostnet_jax.optim.weight_decay_mask`
  (no decay on BatchNorm parameters and biases).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ghostnet_jax
from ghostnet_jax import optim, sharding
from ghostnet_jax.datasets.digits import digits_split_indices
from ghostnet_jax.layers import BatchNorm, Conv2d
from ghostnet_jax.registry import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = 11  # background + the ten digits
DIGIT_SCALE = 3   # 8x8 digits pasted at 24x24
INK_THRESHOLD = 0.25


# --------------------------------------------------------------------- data


def load_digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{'train'|'test': (images (N, 8, 8) in [0, 1], labels (N,))}``."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0
  labels = digits.target.astype(np.int32)
  split = digits_split_indices(labels)
  return {k: (images[idx], labels[idx]) for k, idx in split.items()}


def make_scenes(digits: tuple[np.ndarray, np.ndarray], num: int, size: int,
                rng: np.random.RandomState,
                max_digits: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """``num`` scenes: images ``(num, size, size, 3)`` normalised with the
  ImageNet mean/std, masks ``(num, size, size)`` int32 in [0, 11)."""
  images, labels = digits
  side = 8 * DIGIT_SCALE
  if size < side:
    raise ValueError(f'image size must be >= {side}, got {size}.')
  grey = np.zeros((num, size, size), np.float32)
  masks = np.zeros((num, size, size), np.int32)
  block = np.ones((DIGIT_SCALE, DIGIT_SCALE), np.float32)
  for i in range(num):
    for _ in range(rng.randint(1, max_digits + 1)):
      k = rng.randint(len(images))
      digit = np.kron(images[k], block)
      r, c = rng.randint(0, size - side + 1, size=2)
      ink = digit > INK_THRESHOLD
      grey[i, r:r + side, c:c + side][ink] = digit[ink]
      masks[i, r:r + side, c:c + side][ink] = labels[k] + 1
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  rgb = (rgb - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(
      IMAGENET_STD, np.float32)
  return rgb.astype(np.float32), masks


# -------------------------------------------------------------------- model


class ConvBnRelu(nn.Module):
  """``(N, H, W, C) -> (N, H, W, features)``: conv (k x k, dilation) -> BN ->
  ReLU, with the package's layers (PyTorch padding and BN semantics)."""
  features: int
  kernel_size: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv2d(self.features, self.kernel_size, dilation=self.dilation,
               name='conv')(x)
    return nn.relu(BatchNorm(name='bn')(x, train))


class DeepLabHead(nn.Module):
  """DeepLabV3+ decoder: ASPP on the deep map, fused with a shallow map.

  ``(low (N, H/4, W/4, Cl), high (N, H/16, W/16, Ch)) -> (N, H/4, W/4,
  num_classes)`` logits::

    a = concat([CBR1x1(high), CBR3x3_r(high) for r in rates,
                broadcast(ReLU(Conv1x1(mean(high))))])
    a = upsample(CBR1x1(a), H/4)
    y = CBR3x3(concat([a, CBR1x1(low)]))
    logits = Conv1x1(y)
  """
  num_classes: int
  features: int = 64
  low_features: int = 24
  rates: Sequence[int] = (2, 4)

  @nn.compact
  def __call__(self, low: jax.Array, high: jax.Array,
               train: bool) -> jax.Array:
    n, h, w, _ = high.shape
    branches = [ConvBnRelu(self.features, name='aspp_0')(high, train)]
    for r in self.rates:
      branches.append(ConvBnRelu(self.features, 3, r,
                                 name=f'aspp_rate{r}')(high, train))
    pooled = high.mean((1, 2), keepdims=True)
    pooled = nn.relu(Conv2d(self.features, 1, use_bias=True,
                            name='aspp_pool')(pooled))
    branches.append(jnp.broadcast_to(pooled, (n, h, w, self.features)))
    a = ConvBnRelu(self.features, name='aspp_proj')(
        jnp.concatenate(branches, -1), train)
    a = jax.image.resize(a, low.shape[:3] + (self.features,), 'bilinear')
    low = ConvBnRelu(self.low_features, name='low_proj')(low, train)
    y = ConvBnRelu(self.features, 3, name='fuse')(
        jnp.concatenate([a, low], -1), train)
    return Conv2d(self.num_classes, 1, use_bias=True, name='classifier')(y)


class Segmenter(nn.Module):
  """Backbone (``features_only``, levels ``(low, high)``) + DeepLab head.

  ``(N, H, W, 3) -> (N, H, W, num_classes)`` logits (bilinear upsampling of
  the head's H/4 output).
  """
  backbone: nn.Module
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    low, high = self.backbone(x, train)
    logits = DeepLabHead(self.num_classes, name='head')(low, high, train)
    return jax.image.resize(logits, x.shape[:3] + (self.num_classes,),
                            'bilinear')


def make_backbone(name: str, output_stride: int) -> tuple[nn.Module, list]:
  """The backbone module and its ``feature_info`` (levels /4 and deepest)."""
  info = ghostnet_jax.feature_info(name, output_stride=output_stride)
  low = next(i for i, lv in enumerate(info) if lv['reduction'] == 4)
  out_indices = (low, len(info) - 1)
  backbone = ghostnet_jax.create_model(
      name, features_only=True, out_indices=out_indices,
      output_stride=output_stride)
  return backbone, [info[i] for i in out_indices]


# ------------------------------------------------------------------ metrics


def confusion(pred: np.ndarray, target: np.ndarray,
              num_classes: int = NUM_CLASSES) -> np.ndarray:
  """``(C, C)`` counts, rows = target class, columns = predicted class."""
  idx = target.reshape(-1).astype(np.int64) * num_classes + pred.reshape(-1)
  return np.bincount(idx, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def mean_iou(conf: np.ndarray) -> float:
  """Mean over classes present (in target or prediction) of TP / union."""
  tp = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - tp
  present = union > 0
  return float(np.mean(tp[present] / union[present]))


# ----------------------------------------------------------------- training


@dataclasses.dataclass
class Config:
  backbone: str = 'ghostnet_050'
  output_stride: int = 16
  image_size: int = 64
  batch_size: int = 32
  steps: int = 1200
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  weight_decay: float = 1e-4
  eval_every: int = 200
  test_scenes: int = 256
  seed: int = 0
  torch_checkpoint: str | None = None


def init_variables(model: Segmenter, config: Config) -> dict:
  """Random variables; the backbone's from a checkpoint when one is given."""
  variables = ghostnet_jax.init_variables(model, config.seed,
                                         image_size=config.image_size)
  if config.torch_checkpoint:
    from ghostnet_jax import convert  # pylint: disable=g-import-not-at-top
    source = convert.load_torch_checkpoint(config.torch_checkpoint,
                                           config.backbone)
    loaded = ghostnet_jax.transfer_variables(model.backbone, source)
    for c in ('params', 'batch_stats'):
      variables[c] = dict(variables[c], backbone=loaded[c])
  return variables


def make_steps(model: Segmenter, tx: optax.GradientTransformation, mesh):
  """The jitted train step and predict function (sharded over ``mesh``)."""
  data = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)

  def loss_fn(params, batch_stats, images, masks):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), masks).mean()
    return loss, updates['batch_stats']

  @functools.partial(jax.jit, in_shardings=(repl, data),
                     out_shardings=(repl, repl), donate_argnums=0)
  def train_step(state, batch):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['batch_stats'], batch['images'],
        batch['masks'])
    updates, opt_state = tx.update(grads, state['opt_state'],
                                   state['params'])
    params = optax.apply_updates(state['params'], updates)
    return {'params': params, 'batch_stats': batch_stats,
            'opt_state': opt_state}, loss

  @functools.partial(jax.jit, in_shardings=(repl, data), out_shardings=data)
  def predict(state, images):
    logits = model.apply({'params': state['params'],
                          'batch_stats': state['batch_stats']}, images)
    return jnp.argmax(logits, -1).astype(jnp.int32)

  return train_step, predict


def evaluate(predict, state, test: tuple[np.ndarray, np.ndarray],
             batch_size: int, data_sharding) -> float:
  images, masks = test
  conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for i in range(0, len(images) - batch_size + 1, batch_size):
    batch = sharding.put_batch({'images': images[i:i + batch_size]},
                               data_sharding)
    pred = np.asarray(predict(state, batch['images']))
    conf += confusion(pred, masks[i:i + batch_size])
  return mean_iou(conf)


def train(config: Config, log=print) -> dict[str, Any]:
  """Trains and evaluates; returns the loss / mIoU history and timings."""
  mesh = sharding.make_mesh((-1, 1))
  n_dev = mesh.devices.size
  if config.batch_size % n_dev:
    raise ValueError(f'batch_size {config.batch_size} must be divisible by '
                     f'the {n_dev} devices.')
  data_sharding = sharding.batch_sharding(mesh)
  digits = load_digit_splits()
  rng = np.random.RandomState(config.seed)
  test = make_scenes(digits['test'], config.test_scenes, config.image_size,
                     np.random.RandomState(1234))

  backbone, levels = make_backbone(config.backbone, config.output_stride)
  log(f'backbone {config.backbone}, output stride {config.output_stride}, '
      f'levels {levels}')
  model = Segmenter(backbone)
  variables = init_variables(model, config)
  schedule = optim.make_schedule(
      schedule='cosine', learning_rate=config.learning_rate,
      total_steps=config.steps, warmup_steps=config.warmup_steps)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay,
                   mask=optim.weight_decay_mask)
  state = {'params': variables['params'],
           'batch_stats': variables['batch_stats'],
           'opt_state': tx.init(variables['params'])}
  state = jax.device_put(state, sharding.replicated(mesh))
  train_step, predict = make_steps(model, tx, mesh)

  history = []
  eval_bs = min(config.batch_size, config.test_scenes)
  miou = evaluate(predict, state, test, eval_bs, data_sharding)
  history.append({'step': 0, 'loss': None, 'test_miou': miou})
  log(f'step 0: test mIoU {miou:.4f}')
  losses, t0 = [], time.time()
  for step in range(1, config.steps + 1):
    images, masks = make_scenes(digits['train'], config.batch_size,
                                config.image_size, rng)
    batch = sharding.put_batch({'images': images, 'masks': masks},
                               data_sharding)
    state, loss = train_step(state, batch)
    losses.append(loss)
    if step % config.eval_every == 0 or step == config.steps:
      mean_loss = float(np.mean([float(x) for x in losses]))
      losses = []
      miou = evaluate(predict, state, test, eval_bs, data_sharding)
      history.append({'step': step, 'loss': mean_loss, 'test_miou': miou})
      log(f'step {step}: train loss {mean_loss:.4f}, test mIoU {miou:.4f} '
          f'({time.time() - t0:.0f} s)')
  return {'config': dataclasses.asdict(config), 'history': history,
          'seconds': time.time() - t0, 'devices': n_dev,
          'backend': jax.default_backend()}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for field in dataclasses.fields(Config):
    flag = '--' + field.name.replace('_', '-')
    kind = {'int': int, 'float': float, 'str': str}.get(
        str(field.type).split(' ')[0], str)
    parser.add_argument(flag, type=kind, default=field.default)
  parser.add_argument('--json-out', default=None,
                      help='write the history as JSON here')
  args = vars(parser.parse_args(argv))
  json_out = args.pop('json_out')
  result = train(Config(**args))
  if json_out:
    with open(json_out, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
