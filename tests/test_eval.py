"""Tests of eval.py and ghostnet_jax.eval_lib.

Checkpoints are timm models with random weights saved by ``torch.save``:
ghostnet_050 with a 10-class head for the dataset paths (32x32 inputs, so a
pass costs little), ghostnet_100 for photo classification. Datasets are
mocked tfds builders defined here (``tfds.testing.mock_data``, data-source
policy, no TensorFlow) and the real bundled digits. The CLI runs in-process
through ``eval_lib.main`` (which is all ``eval.py`` calls) so that compiled
steps are shared between tests; ``eval.py`` itself runs as a subprocess where
the exit status and the absence of a traceback are the point.
"""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image

import ghostnet_jax
from ghostnet_jax import convert, eval_lib
from ghostnet_jax.datasets import prepare_digits
from ghostnet_jax import input_pipeline as ip
from eval_mock_data import N_CLASSES, N_MOCK, mock
from ghostnet_jax.testing.torch_reference import nchw, randomize_torch_model, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # Not a divisor of N_MOCK.
# The dataset runs evaluate ghostnet_050 / 10 classes at 32x32 with global
# batch 8 everywhere, so they share one compiled step.
SMALL = ['--image_size', '32', '--crop_fraction', '1.0',
         '--batch_size', str(BATCH), '--no_progress']


def _run(argv, capsys):
  """``eval.py argv`` in-process: ``(exit status, stdout, stderr)``."""
  try:
    rc = eval_lib.main([str(a) for a in argv])
  except SystemExit as e:  # argparse
    rc = e.code
  out, err = capsys.readouterr()
  return rc, out, err


def _topk_counts(logits, labels, k):
  """Hits by a stable argsort (lower index first among ties, as lax.top_k)."""
  order = np.argsort(-logits, axis=1, kind='stable')[:, :k]
  return int((order == labels[:, None]).any(1).sum())


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def small_torch(timm):
  model = timm.create_model('ghostnet_050', num_classes=N_CLASSES).eval()
  randomize_torch_model(model, 3)
  return model


@pytest.fixture(scope='module')
def small_pth(small_torch, tmp_path_factory):
  path = tmp_path_factory.mktemp('small') / 'ghostnet_050_10.pth'
  torch.save(small_torch.state_dict(), path)
  return str(path)


@pytest.fixture(scope='module')
def big_torch(timm):
  model = timm.create_model('ghostnet_100').eval()
  randomize_torch_model(model, 5)
  return model


@pytest.fixture(scope='module')
def big_pth(big_torch, tmp_path_factory):
  path = tmp_path_factory.mktemp('big') / 'ghostnet_100.pth'
  torch.save(big_torch.state_dict(), path)
  return str(path)


def test_imagenet_classes_are_package_data():
  names = ghostnet_jax.imagenet_classes()
  assert len(names) == 1000 and len(set(names)) > 990
  assert names[0].startswith('tench') and names[281] == 'tabby, tabby cat'
  synsets = ghostnet_jax.imagenet_synsets()
  assert len(set(synsets)) == 1000 and synsets[281] == 'n02123045'


def test_torch_model_and_classes_are_inferred(small_pth):
  loaded = eval_lib.load_checkpoint(small_pth)
  assert (loaded.kind, loaded.model, loaded.num_classes) == (
      'torch', 'ghostnet_050', N_CLASSES)
  assert loaded.ema is False and loaded.class_names is None


def test_ema_weights_are_preferred_and_selectable(small_torch, tmp_path):
  regular = small_torch.state_dict()
  ema = collections.OrderedDict((k, v * 2 if v.is_floating_point() else v)
                                for k, v in regular.items())
  path = tmp_path / 'train.pth.tar'
  torch.save({'state_dict': regular, 'state_dict_ema': ema, 'epoch': 3}, path)
  kernel = lambda c: np.asarray(c.variables['params']['conv_stem']['kernel'])
  plain = kernel(eval_lib.load_checkpoint(path, ema=False))
  chosen = eval_lib.load_checkpoint(path)
  assert chosen.ema is True
  np.testing.assert_allclose(kernel(chosen), 2 * plain)
  assert eval_lib.load_checkpoint(path, ema=True).ema is True
  assert eval_lib.load_checkpoint(path, ema=False).ema is False


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def mock_run(small_pth):
  """The library's pass over the mocked split, with its logits."""
  with mock():
    return eval_lib.evaluate(
        small_pth, dataset='ghostnet_eval_mock', split='validation',
        image_size=32, crop_fraction=1.0, batch_size=BATCH, progress=False,
        return_logits=True)


def test_library_counts_every_example_once(mock_run, small_torch):
  r = mock_run
  assert r['num_examples'] == N_MOCK and r['global_batch_size'] == BATCH
  logits, labels = r['logits'], r['labels']
  assert logits.shape == (N_MOCK, N_CLASSES) and labels.shape == (N_MOCK,)
  # The mocked labels, in split order (padding rows dropped).
  with mock():
    source = tfds.data_source('ghostnet_eval_mock', split='validation')
    np.testing.assert_array_equal(labels, [source[i]['label']
                                           for i in range(N_MOCK)])
    batch = next(ip.eval_iterator(
        dataset='ghostnet_eval_mock', data_dir=None, split='validation',
        global_batch_size=N_MOCK, image_size=32, crop_fraction=1.0,
        process_index=0, process_count=1))
  # The logits are the model's on the preprocessed images (timm reference).
  with torch.no_grad():
    ref = small_torch(nchw(batch['image'])).numpy()
  assert relative_error(logits, ref) < 1e-4
  c1, c5 = _topk_counts(logits, labels, 1), _topk_counts(logits, labels, 5)
  assert (r['correct_top1'], r['correct_top5']) == (c1, c5)
  assert r['top1'] == pytest.approx(100.0 * c1 / N_MOCK, abs=1e-12)
  assert r['top5'] == pytest.approx(100.0 * c5 / N_MOCK, abs=1e-12)
  assert 0.0 <= r['top1'] <= r['top5'] <= 100.0
  # The same counts from timm's logits: masking and counting are right.
  assert (_topk_counts(ref, labels, 1), _topk_counts(ref, labels, 5)) == (c1, c5)
  assert 0 < c5 < N_MOCK  # 10 classes: neither none nor all in the top 5.
  assert r['model'] == 'ghostnet_050' and r['metrics_unit'] == 'percent'
  assert r['preprocessing']['input_size'] == 32


def test_cli_matches_the_library(mock_run, small_pth, tmp_path, capsys):
  out_json = tmp_path / 'results.json'
  with mock():
    rc, out, err = _run(['--checkpoint', small_pth, '--dataset',
                         'ghostnet_eval_mock', '--output', out_json] + SMALL,
                        capsys)
  assert rc == 0, err
  results = json.loads(out_json.read_text())
  for key in ('top1', 'top5', 'num_examples', 'correct_top1', 'correct_top5'):
    assert results[key] == mock_run[key], key
  assert results['split'] == 'validation'  # The default split.
  assert results['ema'] is False and results['images_per_second'] > 0
  assert 'top-1' in out and f'{N_MOCK} examples' in out


def test_sharded_over_several_devices():
  """4 CPU devices with batch 6 -> 8 count what 1 device with batch 6 does."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'eval_sharded_worker.py')],
      capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(run.stdout.strip().splitlines()[-1])
  four, one = results['4'], results['1']
  assert (four['num_devices'], four['global_batch_size']) == (4, 8)
  assert (one['num_devices'], one['global_batch_size']) == (1, 6)
  logits, labels = np.array(four['logits']), np.array(four['labels'])
  assert logits.shape == (N_MOCK, N_CLASSES)
  np.testing.assert_allclose(logits, one['logits'], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, one['labels'])
  for r in (four, one):
    assert r['num_examples'] == N_MOCK
    assert r['correct_top1'] == _topk_counts(logits, labels, 1)
    assert r['correct_top5'] == _topk_counts(logits, labels, 5)
  assert 0 < four['correct_top5'] < N_MOCK


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  prepare_digits(str(path))
  return str(path)


def test_digits_end_to_end_through_a_converted_checkpoint(
    small_pth, digits_dir, tmp_path, capsys):
  converted = tmp_path / 'converted'
  assert convert.main(['--model', 'ghostnet_050', '--num-classes', '10',
                       '--torch-checkpoint', small_pth,
                       '--output', str(converted)]) == 0
  out_json = tmp_path / 'digits.json'
  # No --split: digits has no validation split, so its test split is used.
  rc, out, err = _run(['--checkpoint', converted, '--dataset',
                       'ghostnet_digits/32', '--data_dir', digits_dir,
                       '--output', out_json] + SMALL, capsys)
  assert rc == 0, err
  r = json.loads(out_json.read_text())
  for key in ('top1', 'top5', 'num_examples', 'model', 'checkpoint', 'dataset',
              'split', 'preprocessing', 'ema', 'images_per_second'):
    assert key in r, key
  assert r['num_examples'] == 359  # The digits test split, each once.
  assert r['correct_top1'] <= r['correct_top5'] <= 359
  assert r['top1'] == pytest.approx(100 * r['correct_top1'] / 359)
  assert (r['model'], r['dataset'], r['split']) == (
      'ghostnet_050', 'ghostnet_digits/32', 'test')
  assert r['checkpoint'] == str(converted) and r['checkpoint_kind'] == 'converted'
  assert r['preprocessing'] == {
      'name': 'official', 'input_size': 32, 'crop_fraction': 1.0,
      'interpolation': 'bilinear', 'mean': [0.485, 0.456, 0.406],
      'std': [0.229, 0.224, 0.225]}


# ---------------------------------------------------------------------------
# train.py workdirs
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def workdir(digits_dir, tmp_path_factory):
  """A 4-step run of a tiny GhostNet on the digits, with an EMA."""
  import train_test_utils
  from ghostnet_jax import train_lib
  config = train_test_utils.tiny_config(
      dataset='ghostnet_digits/32', data_dir=digits_dir, eval_split='test',
      ema_decay=0.5, async_checkpointing=False)
  path = tmp_path_factory.mktemp('run') / 'workdir'
  train_lib.train_and_evaluate(config, str(path))
  with open(path / 'final_metrics.json') as f:
    return str(path), json.load(f)


def test_workdir_alone_reproduces_the_runs_final_top1(workdir, tmp_path,
                                                      capsys):
  path, final = workdir
  out_json = tmp_path / 'results.json'
  rc, out, err = _run(['--checkpoint', path, '--output', out_json,
                       '--no_progress'], capsys)
  assert rc == 0, err
  r = json.loads(out_json.read_text())
  assert r['num_examples'] == final['eval_examples'] == 359
  # The run reports fractions; eval reports percent. Same hits exactly.
  assert r['correct_top1'] == round(final['top1'] * 359)
  assert r['correct_top5'] == round(final['top5'] * 359)
  assert r['top1'] == pytest.approx(100 * final['top1'], abs=1e-9)
  assert r['top5'] == pytest.approx(100 * final['top5'], abs=1e-9)
  # Everything came from the workdir.
  assert (r['model'], r['dataset'], r['split'], r['checkpoint_kind']) == (
      'ghostnet_050', 'ghostnet_digits/32', 'test', 'workdir')
  assert r['ema'] is True and r['step'] == final['step'] == 4
  assert r['preprocessing'] == {
      'name': 'workdir', 'input_size': 16, 'crop_fraction': 1.0,
      'interpolation': 'bilinear', 'mean': [0.5, 0.5, 0.5],
      'std': [0.5, 0.5, 0.5]}
  assert r['checkpoint_metrics'] == {'top1': pytest.approx(final['top1'])}


@pytest.mark.slow
def test_digits_workdir_at_48_pixels_reproduces_the_runs_top1(
    digits_dir, tmp_path, capsys):
  """A run on 'digits' above 32 pixels reads ghostnet_digits/64; eval.py on
  the workdir alone must read the same data and count the same hits."""
  import train_test_utils
  from ghostnet_jax import train_lib
  config = train_test_utils.tiny_config(
      dataset='digits', data_dir=digits_dir, image_size=48, eval_split='test',
      num_train_steps=2, checkpoint_every_steps=2, async_checkpointing=False)
  path = tmp_path / 'workdir'
  final = train_lib.train_and_evaluate(config, str(path))
  out_json = tmp_path / 'results.json'
  rc, _, err = _run(['--checkpoint', path, '--output', out_json,
                     '--no_progress'], capsys)
  assert rc == 0, err
  r = json.loads(out_json.read_text())
  assert (r['dataset'], r['split']) == ('ghostnet_digits/64', 'test')
  assert r['preprocessing']['input_size'] == 48
  assert r['num_examples'] == final['eval_examples'] == 359
  assert r['correct_top1'] == round(final['top1'] * 359)
  assert r['correct_top5'] == round(final['top5'] * 359)
  assert r['top1'] == pytest.approx(100 * final['top1'], abs=1e-9)


def test_workdir_dataset_of_runs_that_did_not_record_it():
  from ghostnet_jax import loading
  assert loading.workdir_dataset(
      {'dataset': 'digits', 'image_size': 48}, {}) == 'ghostnet_digits/64'
  assert loading.workdir_dataset(
      {'dataset': 'digits', 'image_size': 16}, {}) == 'ghostnet_digits/32'
  assert loading.workdir_dataset(
      {'dataset': 'digits', 'image_size': 48},
      {'dataset': 'digits', 'dataset_name': 'ghostnet_digits/64'}
  ) == 'ghostnet_digits/64'
  assert loading.workdir_dataset({'dataset': 'cifar10'}, {}) == 'cifar10'


def test_workdir_options(workdir, image_files, capsys):
  path, final = workdir
  rc, out, err = _run(['--checkpoint', path, '--no-ema', '--which', 'latest',
                       '--no_progress'], capsys)
  assert rc == 0, err
  assert 'ema False' in out and '359 examples' in out
  rc, _, err = _run(['--checkpoint', path, '--which', '1'], capsys)
  assert rc == 2 and 'error: Step 1 is not in' in err and '[2, 4]' in err
  rc, _, err = _run(['--checkpoint', path, '--model', 'ghostnet_100'], capsys)
  assert rc == 2 and 'is a ghostnet_050 run, but --model ghostnet_100' in err
  # Photos get the run's class names ('0'...'9').
  rc, out, err = _run(['--checkpoint', path, '--images',
                       image_files['grey.png'], '--top_k', '2'], capsys)
  assert rc == 0, err
  lines = out.splitlines()
  assert len(lines) == 3
  for line in lines[1:]:
    name, index = line.split('%  ')[1].split(' (')
    assert name == index.rstrip(')') and 0 <= int(name) <= 9


def test_images_in_several_batches(workdir, image_files):
  """5 readable files (+1 corrupt) in batches of 2: the same as in one batch."""
  names = ('chelsea.png', 'corrupt.jpg', 'coffee.jpg', 'grey.png',
           'grey16.png', 'rgba.png')
  paths = [image_files[n] for n in names]
  loaded = eval_lib.load_checkpoint(workdir[0])
  whole = eval_lib.classify_images(loaded, paths, return_inputs=True)
  parts = eval_lib.classify_images(loaded, paths, batch_size=2,
                                   return_inputs=True)
  assert [p['file'] for p in parts['predictions']] == [
      p for p in paths if 'corrupt' not in p]
  assert [e.path for e in parts['errors']] == [image_files['corrupt.jpg']]
  np.testing.assert_array_equal(parts['inputs'], whole['inputs'])
  np.testing.assert_allclose(parts['logits'], whole['logits'], rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket')


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  """Photos (PNG and JPEG), the same pixels in other modes, and bad files."""
  from skimage import data
  d = tmp_path_factory.mktemp('images')
  files = {}

  def save(name, image, **kw):
    files[name] = str(d / name)
    image.save(files[name], **kw)

  for i, name in enumerate(PHOTOS):
    fmt = 'png' if i % 2 == 0 else 'jpg'
    save(f'{name}.{fmt}', Image.fromarray(getattr(data, name)()))
  grey = np.asarray(Image.fromarray(data.chelsea()).convert('L'))
  save('grey.png', Image.fromarray(grey, mode='L'))
  save('grey16.png', Image.fromarray(grey.astype(np.uint16) * 257))
  save('grey_as_rgb.png', Image.fromarray(np.repeat(grey[:, :, None], 3, 2)))
  coffee = data.coffee()
  alpha = np.full(coffee.shape[:2], 255, np.uint8)
  alpha[:, :200] = 0        # Left part fully transparent,
  alpha[:, 200:300] = 128   # then half transparent.
  save('rgba.png', Image.fromarray(np.dstack([coffee, alpha])))
  a = alpha[:, :, None] / 255.0
  on_white = np.round(coffee * a + 255.0 * (1 - a)).astype(np.uint8)
  save('rgba_on_white.png', Image.fromarray(on_white))
  files['corrupt.jpg'] = str(d / 'corrupt.jpg')
  with open(files['coffee.jpg'], 'rb') as f:
    head = f.read(2000)
  with open(files['corrupt.jpg'], 'wb') as f:
    f.write(head)  # A JPEG cut short.
  return files


IMAGE_ORDER = ('chelsea.png', 'coffee.jpg', 'astronaut.png', 'rocket.jpg',
               'grey.png', 'grey16.png', 'grey_as_rgb.png', 'rgba.png',
               'rgba_on_white.png', 'corrupt.jpg')


@pytest.fixture(scope='module')
def image_run(big_pth, image_files, tmp_path_factory):
  """``eval.py --images`` over every file: status, output, JSON, inputs."""
  out_json = tmp_path_factory.mktemp('out') / 'predictions.json'
  paths = [image_files[n] for n in IMAGE_ORDER]
  cap = _Capture()
  with cap:
    rc = eval_lib.main(['--checkpoint', big_pth, '--images', *paths,
                        '--output', str(out_json)])
  library = eval_lib.classify_images(big_pth, paths, return_inputs=True)
  return {'rc': rc, 'out': cap.out, 'err': cap.err,
          'json': json.loads(out_json.read_text()), 'library': library}


class _Capture:
  """Captures sys.stdout / sys.stderr (a module-scoped capsys)."""

  def __enter__(self):
    import io
    self._saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    return self

  def __exit__(self, *exc):
    self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
    sys.stdout, sys.stderr = self._saved


def _by_file(predictions):
  return {os.path.basename(p['file']): [t['index'] for t in p['top_k']]
          for p in predictions}


def test_photos_top5_match_timm(image_run, big_torch):
  lib = image_run['library']
  readable = [n for n in IMAGE_ORDER if n != 'corrupt.jpg']
  assert [os.path.basename(p['file']) for p in lib['predictions']] == readable
  inputs = lib['inputs']
  assert inputs.shape == (len(readable), 224, 224, 3)
  np.testing.assert_array_equal(
      inputs[0], eval_lib.preprocess_image(
          eval_lib.load_image(lib['predictions'][0]['file']),
          ghostnet_jax.get_eval_config('ghostnet_100', 'official')))
  with torch.no_grad():
    ref = big_torch(nchw(inputs)).numpy()
  assert relative_error(lib['logits'], ref) < 1e-4
  ref_top5 = np.argsort(-ref, axis=1, kind='stable')[:, :5]
  ours = _by_file(image_run['json']['predictions'])
  for name, expected in zip(readable, ref_top5):
    assert ours[name] == expected.tolist(), name
  # Distinct photos, distinct answers: the comparison can fail.
  assert len({tuple(ours[f'{n}.{"png" if i % 2 == 0 else "jpg"}'])
              for i, n in enumerate(PHOTOS)}) == len(PHOTOS)
  for p in image_run['json']['predictions']:
    probs = [t['probability'] for t in p['top_k']]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_printed_with_imagenet_class_names(image_run):
  out = image_run['out']
  names = ghostnet_jax.imagenet_classes()
  first = image_run['json']['predictions'][0]
  assert first['file'] + ':' in out
  top = first['top_k'][0]
  assert top['class'] == names[top['index']]
  assert f'1. {100 * top["probability"]:6.2f}%  {top["class"]} ({top["index"]})' in out
  assert out.count('  5. ') == len(IMAGE_ORDER) - 1


def test_grey_rgba_and_16bit_images_are_read_as_rgb(image_run):
  lib = image_run['library']
  names = [os.path.basename(p['file']) for p in lib['predictions']]
  inputs = dict(zip(names, lib['inputs']))
  top5 = _by_file(image_run['json']['predictions'])
  for name, same_as in (('grey.png', 'grey_as_rgb.png'),
                        ('grey16.png', 'grey_as_rgb.png'),
                        ('rgba.png', 'rgba_on_white.png')):
    np.testing.assert_array_equal(inputs[name], inputs[same_as], err_msg=name)
    assert top5[name] == top5[same_as], name
  # Not vacuous: grey differs from colour, and alpha was not just dropped.
  assert not np.array_equal(inputs['grey.png'], inputs['chelsea.png'])
  from skimage import data
  config = ghostnet_jax.get_eval_config('ghostnet_100', 'official')
  dropped = eval_lib.preprocess_image(data.coffee(), config)
  assert np.abs(inputs['rgba.png'] - dropped).max() > 1.0


def test_corrupt_image_is_named_and_the_rest_still_classified(image_run,
                                                              image_files):
  assert image_run['rc'] == 2
  err = image_run['err']
  assert f'error: {image_files["corrupt.jpg"]}: cannot read this image' in err
  assert 'Traceback' not in err
  assert len(image_run['json']['predictions']) == len(IMAGE_ORDER) - 1
  assert image_run['json']['errors'] == [
      {'file': image_files['corrupt.jpg'],
       'error': image_run['library']['errors'][0].problem}]


def test_converted_directory_classifies_the_same(image_run, big_pth,
                                                 image_files, tmp_path):
  converted = tmp_path / 'g100'
  assert convert.main(['--model', 'ghostnet_100', '--torch-checkpoint',
                       big_pth, '--output', str(converted)]) == 0
  paths = [image_files[n] for n in IMAGE_ORDER]
  result = eval_lib.classify_images(str(converted), paths, return_inputs=True)
  assert result['checkpoint_kind'] == 'converted'
  assert _by_file(result['predictions']) == _by_file(
      image_run['json']['predictions'])
  np.testing.assert_array_equal(result['logits'],
                                image_run['library']['logits'])


def test_class_names_of_a_small_head(small_pth, digits_dir):
  loaded = eval_lib.load_checkpoint(small_pth, model='ghostnet_050')
  assert eval_lib.class_names_for(loaded) is None  # Indices then.
  names = eval_lib.class_names_for(loaded, 'ghostnet_digits/32', digits_dir)
  assert names == tuple(str(d) for d in range(10))
  result = {'predictions': [{'file': 'a.png', 'top_k': [
      {'index': 3, 'class': None, 'probability': 0.5},
      {'index': 7, 'class': '7', 'probability': 0.25}]}]}
  assert eval_lib.format_predictions(result).splitlines() == [
      'a.png:', '  1.  50.00%  class 3', '  2.  25.00%  7 (7)']


def test_load_image_modes(tmp_path):
  rgb = np.random.RandomState(0).randint(0, 256, (20, 30, 3)).astype(np.uint8)
  grey = rgb[:, :, 0]

  def roundtrip(image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return eval_lib.load_image(path)

  np.testing.assert_array_equal(roundtrip(Image.fromarray(rgb), 'a.png'), rgb)
  np.testing.assert_array_equal(
      roundtrip(Image.fromarray(grey, mode='L'), 'g.png'),
      np.repeat(grey[:, :, None], 3, 2))
  # 16 bits: v * 257 reads back as v (PIL's own conversion would clip at 255).
  sixteen = roundtrip(Image.fromarray(grey.astype(np.uint16) * 257), 'g16.png')
  np.testing.assert_array_equal(sixteen, np.repeat(grey[:, :, None], 3, 2))
  # Opaque RGBA is the RGB image; transparent pixels show white.
  opaque = np.dstack([rgb, np.full(grey.shape, 255, np.uint8)])
  np.testing.assert_array_equal(roundtrip(Image.fromarray(opaque), 'o.png'), rgb)
  clear = np.dstack([rgb, np.zeros(grey.shape, np.uint8)])
  assert (roundtrip(Image.fromarray(clear), 'c.png') == 255).all()
  # Palette, bilevel and CMYK: PIL's RGB conversion.
  pal = Image.fromarray(rgb).quantize(16)
  np.testing.assert_array_equal(roundtrip(pal, 'p.png'),
                                np.asarray(pal.convert('RGB')))
  cmyk = Image.fromarray(rgb).convert('CMYK')
  out = roundtrip(cmyk, 'k.tiff')
  np.testing.assert_array_equal(out, np.asarray(cmyk.convert('RGB')))
  assert out.shape == (20, 30, 3) and out.dtype == np.uint8
  # EXIF orientation 6 (rotate 90 degrees clockwise to view).
  exif = Image.Exif()
  exif[0x0112] = 6
  rotated = roundtrip(Image.fromarray(rgb), 'r.jpg', exif=exif, quality=100)
  assert rotated.shape == (30, 20, 3)


def test_unreadable_files_raise_image_errors_naming_them(tmp_path):
  junk = tmp_path / 'junk.png'
  junk.write_bytes(b'\x89PNG but not really')
  empty = tmp_path / 'empty.jpg'
  empty.write_bytes(b'')
  for path, words in ((junk, 'cannot read this image'),
                      (empty, 'cannot read this image'),
                      (tmp_path / 'missing.png', 'file not found'),
                      (tmp_path, 'is a directory')):
    with pytest.raises(eval_lib.ImageError) as e:
      eval_lib.load_image(path)
    assert str(e.value).startswith(f'{path}: ') and words in str(e.value)


# ---------------------------------------------------------------------------
# Bad input through the CLI
# ---------------------------------------------------------------------------

def test_missing_checkpoint(tmp_path, capsys):
  rc, _, err = _run(['--checkpoint', tmp_path / 'nope.pth'], capsys)
  assert rc == 2
  assert err.startswith(f'error: Checkpoint not found: {tmp_path / "nope.pth"}')


def test_checkpoint_of_another_architecture(small_pth, capsys):
  rc, _, err = _run(['--checkpoint', small_pth, '--model', 'ghostnet_100',
                     '--images', 'x.png'], capsys)
  assert rc == 2
  assert err.startswith(f'error: {small_pth} does not match ghostnet_100')
  assert 'mis-shaped' in err
  assert 'blocks.0.0.ghost1.primary_conv.0.weight: (4, 8, 1, 1) vs (8, 16, 1, 1)' in err
  assert 'is a ghostnet_050 checkpoint: pass --model ghostnet_050' in err


def test_checkpoint_of_an_unknown_architecture(tmp_path, capsys):
  path = tmp_path / 'mlp.pth'
  torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4)).state_dict(), path)
  rc, _, err = _run(['--checkpoint', path], capsys)
  assert rc == 2 and 'Cannot tell which model' in err and '--model' in err
  rc, _, err = _run(['--checkpoint', path, '--model', 'ghostnet_050'], capsys)
  assert rc == 2 and 'missing' in err and '0.weight' in err


def test_dataset_without_labels(small_pth, capsys):
  with mock():
    rc, _, err = _run(['--checkpoint', small_pth, '--dataset',
                       'ghostnet_eval_unlabeled'] + SMALL, capsys)
  assert rc == 2
  assert "no ClassLabel feature 'label'" in err and err.startswith('error: ')


def test_dataset_with_other_classes(big_pth, digits_dir, capsys):
  rc, _, err = _run(['--checkpoint', big_pth, '--dataset', 'ghostnet_digits/32',
                     '--data_dir', digits_dir], capsys)
  assert rc == 2
  assert 'model has 1000 outputs but dataset' in err and '10 classes' in err


@pytest.mark.parametrize('argv,words', [
    (['--model', 'ghostnet_1000'], "Unknown model 'ghostnet_1000'. Did you mean"),
    (['--dataset', 'imagenet2013'], "Unknown tfds dataset 'imagenet2013'"),
    (['--preprocess', 'fancy'], "argument --preprocess: invalid choice: 'fancy'"),
    (['--which', 'first'], "argument --which: expected 'best', 'latest'"),
])
def test_unknown_names(small_pth, argv, words, capsys):
  rc, _, err = _run(['--checkpoint', small_pth] + argv, capsys)
  assert rc == 2 and words in err and 'Traceback' not in err


def test_converted_checkpoint_with_the_other_ema_choice(small_pth, tmp_path,
                                                        capsys):
  converted = tmp_path / 'c'
  assert convert.main(['--model', 'ghostnet_050', '--num-classes', '10',
                       '--torch-checkpoint', small_pth, '--no-ema',
                       '--output', str(converted)]) == 0
  rc, _, err = _run(['--checkpoint', converted, '--ema'], capsys)
  assert rc == 2 and 'holds the regular weights only' in err


def test_eval_py_reports_mistakes_without_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for argv, words in (
      (['--checkpoint', str(tmp_path / 'nope')], 'error: Checkpoint not found'),
      (['--checkpoint', 'x', '--preprocess', 'fancy'], 'invalid choice')):
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py')] + argv,
                         capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=False)
    assert run.returncode == 2, run.stderr
    assert words in run.stderr and 'Traceback' not in run.stderr
