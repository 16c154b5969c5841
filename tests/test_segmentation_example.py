"""examples/segmentation.py: its data, its metric, and a tiny training run."""

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / 'examples' / (
    'segmentation.py')


@pytest.fixture(scope='module')
def seg():
  spec = importlib.util.spec_from_file_location('segmentation_example',
                                                _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_scenes_label_every_ink_pixel(seg):
  digits = seg.load_digit_splits()
  assert len(digits['train'][0]) == 1438 and len(digits['test'][0]) == 359
  images, masks = seg.make_scenes(digits['train'], 6, 40,
                                  np.random.RandomState(0))
  assert images.shape == (6, 40, 40, 3) and masks.shape == (6, 40, 40)
  grey = images[..., 0] * seg.IMAGENET_STD[0] + seg.IMAGENET_MEAN[0]
  ink = grey > seg.INK_THRESHOLD + 1e-6
  np.testing.assert_array_equal(ink, masks > 0)
  assert masks.max() <= 10 and masks.min() == 0
  with pytest.raises(ValueError, match='>= 24'):
    seg.make_scenes(digits['train'], 1, 16, np.random.RandomState(0))


def test_mean_iou(seg):
  target = np.array([0, 0, 1, 1, 2, 2])
  assert seg.mean_iou(seg.confusion(target, target, 3)) == 1.0
  pred = np.array([0, 1, 1, 1, 2, 0])
  # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 1, union 2.
  want = (1 / 3 + 2 / 3 + 1 / 2) / 3
  assert math.isclose(seg.mean_iou(seg.confusion(pred, target, 3)), want)


@pytest.mark.slow
def test_tiny_training_run(seg):
  """The whole example at a tiny size: it trains (the loss falls) and
  reports mIoU in [0, 1] before and after."""
  config = seg.Config(image_size=32, batch_size=8, steps=16, eval_every=8,
                      test_scenes=8, warmup_steps=0, learning_rate=1e-2)
  result = seg.train(config, log=lambda *_: None)
  history = result['history']
  assert [h['step'] for h in history] == [0, 8, 16]
  assert all(0.0 <= h['test_miou'] <= 1.0 for h in history)
  assert history[2]['loss'] < history[1]['loss']
  assert all(math.isfinite(h['loss']) for h in history[1:])


def test_backbone_starts_from_a_torch_checkpoint(seg, timm, tmp_path):
  """--torch-checkpoint: the converted weights land in params['backbone']
  (only the layers the backbone has); the head keeps its initialisation."""
  import jax
  import torch
  from ghostnet_jax import convert
  from ghostnet_jax.testing.torch_reference import randomize_torch_model
  tmodel = timm.create_model('ghostnet_050', pretrained=False).eval()
  randomize_torch_model(tmodel, seed=3)
  path = tmp_path / 'ghostnet_050.pth'
  torch.save(tmodel.state_dict(), path)
  config = seg.Config(image_size=32, torch_checkpoint=str(path))
  backbone, _ = seg.make_backbone(config.backbone, config.output_stride)
  variables = seg.init_variables(seg.Segmenter(backbone), config)
  source = convert.load_torch_checkpoint(str(path), 'ghostnet_050')
  got = variables['params']['backbone']
  assert 'blocks_8_0' not in got and 'classifier' not in got
  assert 'head' in variables['params']
  for key in ('conv_stem', 'blocks_7_0'):
    same = jax.tree_util.tree_map(lambda a, b: bool((a == b).all()),
                                  got[key], source['params'][key])
    assert all(jax.tree_util.tree_leaves(same)), key
  np.testing.assert_array_equal(
      variables['batch_stats']['backbone']['bn1']['var'],
      source['batch_stats']['bn1']['var'])
