"""ghostnet_jax.export: artifacts that compute the Flax model's logits.

Every family (v1, v2, v3 in deploy form, G-Ghost, Ghost-ResNet-50) is
exported at a small image size with random weights and random BatchNorm
statistics, and the artifact's logits (run by its own runtime) are compared
with the plain Flax eval model: max |diff| / max |logit| <= 1e-4.

Formats need the ``export`` extra; without it their tests skip naming it,
except under CI (``GHOSTNET_JAX_REQUIRE_EXTRAS=1``, set by ``.ci/run``), where
a missing extra fails.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from ghostnet_jax import export
import extras

FAMILIES = {
    'ghostnet': 'ghostnet_050',
    'ghostnetv2': 'ghostnetv2_100',
    'ghostnetv3': 'ghostnetv3_050',
    'g_ghost': 'g_ghost_regnetx_002',
    'ghost_resnet': 'ghost_resnet50_s4',
}
SIZE = 32
# DFC attention (v2, v3) pools 2x2 at the last stage: at least 33 px.
SIZES = {'ghostnetv2': 64, 'ghostnetv3': 64}
TOL = 1e-4


def require(module: str):
  """Imports ``module`` or skips (fails under CI) naming the extra."""
  try:
    return __import__(module, fromlist=['_'])
  except ImportError:
    extras.missing(f"{module} missing: install the 'export' extra (bash "
                   'setup.sh --test, or pip install -e .[export])')


def random_variables(name: str, size: int = SIZE, seed: int = 0,
                     num_classes: int = 10):
  """Training-form variables with random BatchNorm scale, bias, mean, var."""
  from ghostnet_jax import registry
  model = registry.create_model(name, num_classes=num_classes)
  v = jax.jit(model.init)(jax.random.PRNGKey(seed),
                          np.zeros((1, size, size, 3), np.float32))
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    last = path[-1].key
    leaf = np.asarray(leaf)
    if last == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
    if last == 'mean':
      return rng.normal(0, 0.2, leaf.shape).astype(leaf.dtype)
    return leaf

  stats = jax.tree_util.tree_map_with_path(perturb, v['batch_stats'])
  # The BatchNorms' own scale and bias: the params beside each statistic.
  flat = traverse_util.flatten_dict(jax.device_get(v['params']))
  bn_modules = {k[:-1] for k in traverse_util.flatten_dict(stats)}
  for key in list(flat):
    if key[:-1] in bn_modules and key[-1] in ('scale', 'bias'):
      base = 1.0 if key[-1] == 'scale' else 0.0
      leaf = np.asarray(flat[key])
      flat[key] = (base + rng.normal(0, 0.2, leaf.shape)).astype(leaf.dtype)
  params = traverse_util.unflatten_dict(flat)
  return {'params': params, 'batch_stats': stats}, model


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def exportable(request):
  name = FAMILIES[request.param]
  size = SIZES.get(request.param, SIZE)
  variables, _ = random_variables(name, size)
  return export.prepare(model=name, variables=variables, num_classes=10,
                        batch=2, image_size=size)


def _check_sidecar(path, ex, fmt):
  with open(path + '.json') as f:
    meta = json.load(f)
  assert meta['format'] == fmt and meta['model'] == ex.name
  assert meta['input']['layout'] == 'NHWC'
  size = ex.image_size
  assert meta['input']['shape'][1:] == [size, size, 3]
  assert meta['random_weights'] is True
  return meta


def test_random_statistics_change_the_logits(exportable):
  """The BN statistics are not the identity, so folding is exercised."""
  x = exportable.parity_batch()
  logits = np.asarray(exportable.reference(x))
  assert np.max(np.abs(logits)) > 1e-3
  folded = np.asarray(jax.jit(exportable.fn)(x))
  _, rel = export.relative_diff(folded, logits)
  assert rel <= TOL, rel


def test_stablehlo_parity_and_portability(exportable, tmp_path):
  require('flatbuffers')
  path = str(tmp_path / 'model.bin')
  meta = export.export(exportable, 'stablehlo', path)
  _check_sidecar(path, exportable, 'stablehlo')
  rel = meta['parity']['max_abs_diff_over_max_logit']
  print(f'PARITY stablehlo {exportable.name}: {rel:.3g}')
  assert rel <= TOL, rel
  assert meta['platforms'] == ['cpu', 'cuda', 'tpu']
  # Reload without the model code and recompute on a different batch.
  from jax import export as jax_export
  with open(path, 'rb') as f:
    exp = jax_export.deserialize(bytearray(f.read()))
  assert exp.platforms == ('cpu', 'cuda', 'tpu')
  assert 'stablehlo.custom_call' not in exp.mlir_module()
  size = exportable.image_size
  x = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(
      np.float32)
  _, rel = export.relative_diff(exp.call(x), exportable.reference(x))
  assert rel <= TOL, rel


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_accelerator_lowerings_have_no_custom_call(platform):
  """Default conv_impl, traced on this CPU host, lowered for an accelerator."""
  ex = export.prepare(model='ghostnet_050', batch=1, image_size=SIZE)
  exp = jax.export.export(jax.jit(ex.fn), platforms=(platform,))(
      jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), np.float32))
  text = exp.mlir_module()
  assert 'stablehlo.custom_call' not in text
  assert 'stablehlo.convolution' in text


def test_stablehlo_dynamic_batch(tmp_path):
  require('flatbuffers')
  variables, _ = random_variables('ghostnet_050')
  ex = export.prepare(model='ghostnet_050', variables=variables,
                      num_classes=10, batch=None, image_size=SIZE)
  path = str(tmp_path / 'dyn.bin')
  meta = export.export(ex, 'stablehlo', path)
  assert meta['input']['batch'] == 'dynamic'
  assert meta['input']['shape'][0] is None
  call = export.load_stablehlo(path)
  for n in (1, 3):
    x = np.random.default_rng(n).standard_normal((n, SIZE, SIZE, 3)).astype(
        np.float32)
    out = call(x)
    assert out.shape == (n, 10)
    _, rel = export.relative_diff(out, ex.reference(x))
    assert rel <= TOL


def test_onnx_parity(exportable, tmp_path):
  require('jax2onnx')
  require('onnxruntime')
  path = str(tmp_path / 'model.onnx')
  meta = export.export(exportable, 'onnx', path)
  _check_sidecar(path, exportable, 'onnx')
  rel = meta['parity']['max_abs_diff_over_max_logit']
  print(f'PARITY onnx {exportable.name}: {rel:.3g}')
  assert rel <= TOL, rel
  # The final file is self-contained (no external-data side files).
  assert sorted(os.listdir(tmp_path)) == ['model.onnx', 'model.onnx.json']
  x = exportable.parity_batch()[::-1].copy()
  _, rel = export.relative_diff(export.run_onnx(path, x),
                                exportable.reference(x))
  assert rel <= TOL, rel


# ------------------------------------------------------------ bad input


def _run(argv):
  return export.main(argv)


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
  out = tmp_path / 'm.bin'
  out.write_bytes(b'precious')
  rc = _run(['--model', 'ghostnet_050', '--format', 'stablehlo', '--output',
             str(out), '--image-size', str(SIZE)])
  assert rc == 2
  assert 'already exists' in capsys.readouterr().err
  assert out.read_bytes() == b'precious'
  assert sorted(os.listdir(tmp_path)) == ['m.bin']


def test_unknown_format_exits_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _run(['--model', 'ghostnet_050', '--format', 'caffe', '--output',
          str(tmp_path / 'x')])
  assert e.value.code == 2
  assert 'caffe' in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_int8_without_calibration_exits_2(tmp_path, capsys):
  rc = _run(['--model', 'ghostnet_050', '--format', 'tflite', '--output',
             str(tmp_path / 'x.tflite'), '--quantize', 'int8'])
  assert rc == 2
  assert '--calibration' in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_unknown_model_and_missing_model(tmp_path, capsys):
  assert _run(['--model', 'ghostnet_999', '--format', 'stablehlo',
               '--output', str(tmp_path / 'x.bin')]) == 2
  assert 'ghostnet_999' in capsys.readouterr().err
  assert _run(['--format', 'stablehlo', '--output',
               str(tmp_path / 'x.bin')]) == 2
  assert '--checkpoint' in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_checkpoint_that_does_not_match_model(tmp_path, capsys, timm):
  import torch
  path = tmp_path / 'ghostnet_050.pth'
  torch.save(timm.create_model('ghostnet_050').state_dict(), str(path))
  out = tmp_path / 'x.bin'
  rc = _run(['--checkpoint', str(path), '--model', 'ghostnet_100',
             '--format', 'stablehlo', '--output', str(out)])
  assert rc == 2
  err = capsys.readouterr().err
  assert 'error:' in err and 'ghostnet_100' in err
  assert sorted(os.listdir(tmp_path)) == ['ghostnet_050.pth']


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
  variables, _ = random_variables('ghostnet_050')
  ex = export.prepare(model='ghostnet_050', variables=variables,
                      num_classes=10, image_size=SIZE)

  def broken(ex, tmp_path, **_):
    with open(tmp_path, 'wb') as f:
      f.write(b'half')
    raise RuntimeError('disk full')

  monkeypatch.setitem(export._WRITERS, 'stablehlo', broken)
  with pytest.raises(RuntimeError, match='disk full'):
    export.export(ex, 'stablehlo', str(tmp_path / 'm.bin'))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_savedmodel_parity(exportable, tmp_path):
  require('tensorflow')
  path = str(tmp_path / 'saved_model')
  meta = export.export(exportable, 'savedmodel', path)
  _check_sidecar(path, exportable, 'savedmodel')
  rel = meta['parity']['max_abs_diff_over_max_logit']
  print(f'PARITY savedmodel {exportable.name}: {rel:.3g}')
  assert rel <= TOL, rel


@pytest.mark.slow
def test_tflite_fp32_parity(exportable, tmp_path):
  require('tensorflow')
  require('ai_edge_litert')
  path = str(tmp_path / 'model.tflite')
  meta = export.export(exportable, 'tflite', path)
  _check_sidecar(path, exportable, 'tflite')
  rel = meta['parity']['max_abs_diff_over_max_logit']
  print(f'PARITY tflite {exportable.name}: {rel:.3g}')
  assert rel <= TOL, rel
  x = exportable.parity_batch()[::-1].copy()
  _, rel = export.relative_diff(export.run_tflite(path, x),
                                exportable.reference(x))
  assert rel <= TOL, rel


def test_calibration_of_wrong_shape(tmp_path):
  require('tensorflow')
  ex = export.prepare(model='ghostnet_050', num_classes=10, image_size=SIZE)
  with pytest.raises(export.ExportError, match='shape'):
    export.export_tflite(ex, str(tmp_path / 'x.tflite'), quantize='int8',
                         calibration=np.zeros((4, 16, 16, 3), np.float32))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_int8_tflite_of_the_default_digits_model_keeps_its_top1(
    tmp_path_factory, monkeypatch):
  """``python train.py``'s model (configs/default.py, unchanged: 1000 steps),
  exported as fp32 and as int8 TFLite calibrated on 64 training digits: on
  the 359 held-out digits the int8 top-1 is within 1 point of fp32's."""
  require('tensorflow')
  require('ai_edge_litert')
  import train_test_utils
  from configs import default
  from ghostnet_jax import input_pipeline, train_lib
  data_dir = train_test_utils.digits_dir(tmp_path_factory)
  config = default.get_config()
  config.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp('default_run') / 'w')
  train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    run_top1 = json.load(f)['top1']

  monkeypatch.setattr(export, 'DIGITS_DATA_DIR', data_dir)
  ex = export.prepare(checkpoint=workdir, batch=1)
  out = tmp_path_factory.mktemp('tflite')
  fp32, int8 = str(out / 'fp32.tflite'), str(out / 'int8.tflite')
  export.export(ex, 'tflite', fp32)
  meta = export.export(ex, 'tflite', int8, quantize='int8',
                       calibration='digits')
  assert meta['quantize'] == 'int8' and meta['calibration'] == 'digits'
  assert os.path.getsize(int8) < 0.5 * os.path.getsize(fp32)

  pre = ex.preprocessing
  batch = next(iter(input_pipeline.eval_iterator(
      dataset='ghostnet_digits/32', data_dir=data_dir, split='test',
      global_batch_size=384, image_size=ex.image_size,
      crop_fraction=pre['crop_fraction'], interpolation=pre['interpolation'],
      mean=pre['mean'], std=pre['std'], process_index=0, process_count=1)))
  keep = np.asarray(batch['mask']) > 0
  images = np.asarray(batch['image'])[keep]
  labels = np.asarray(batch['label'])[keep]
  assert len(labels) == 359
  top1 = {}
  for kind, path in (('fp32', fp32), ('int8', int8)):
    logits = np.concatenate([export.run_tflite(path, img[None])
                             for img in images])
    top1[kind] = 100.0 * float(np.mean(logits.argmax(-1) == labels))
  print(f"INT8 digits top-1: fp32 {top1['fp32']:.2f}%, int8 "
        f"{top1['int8']:.2f}%, the run's own eval {100 * run_top1:.2f}%; "
        f'sizes {os.path.getsize(fp32)} / {os.path.getsize(int8)} bytes')
  # The fp32 artifact is the run's model: the run's own evaluation agrees.
  assert abs(top1['fp32'] - 100 * run_top1) <= 0.6, (top1, run_top1)
  assert top1['fp32'] > 90.0, top1
  assert abs(top1['int8'] - top1['fp32']) <= 1.0, top1
