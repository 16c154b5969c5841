"""Export a model for deployment: StableHLO, TF SavedModel, TFLite, ONNX.

Command line (``python -m ghostnet_jax.export``)::

  python -m ghostnet_jax.export --checkpoint PATH [--model NAME] \\
      --format {stablehlo,savedmodel,tflite,onnx} --output PATH \\
      [--batch N|dynamic] [--image-size S] \\
      [--quantize int8 --calibration SOURCE] [--overwrite]

``--checkpoint`` takes what ``eval.py`` takes (a PyTorch file, a converted
directory, a ``train.py`` workdir); without it ``--model`` exports random
weights (said in the output and in the sidecar). The exported function maps
one float32 NHWC batch ``(N, S, S, C)``, already normalised with the mean/std
the sidecar records, to logits ``(N, num_classes)``. It is the eval-mode
model with BatchNorm folded into the convolutions
(:func:`ghostnet_jax.inference.fold_batchnorm`) and GhostNetV3 in its deploy
form (:func:`ghostnet_jax.ghostnetv3.reparameterize`).

Every export writes ``OUTPUT.json`` beside the artifact: the model, input
shape and layout, preprocessing, class names source, checkpoint, package
version and the measured difference against the Flax model on a fixed batch.
Artifacts are written under a temporary name and renamed into place, so a
failed export leaves nothing behind and an existing file is replaced only
when the new one is complete (``--overwrite``).

StableHLO is ``jax.export`` serialized (``.bin``), lowered for ``cpu``,
``cuda`` and ``tpu`` in one artifact; the CPU lowering uses the pure-XLA
convolutions (:func:`ghostnet_jax.ops.auto_on_cpu`), so the artifact holds no
custom call and runs wherever ``jax`` does, without this package::

  exp = jax.export.deserialize(open('model.bin', 'rb').read())
  logits = exp.call(images)

The TF SavedModel is written through orbax-export (``JaxModule`` +
``ServingConfig`` + ``ExportManager``), TFLite is converted from it, ONNX
through jax2onnx; these formats need the ``export`` extra
(``pip install -e .[export]``, ``requirements-export.txt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import ghostnet_jax
from ghostnet_jax import inference, ops, registry
from ghostnet_jax.class_names import NUM_IMAGENET_CLASSES

FORMATS = ('stablehlo', 'savedmodel', 'tflite', 'onnx')
STABLEHLO_PLATFORMS = ('cpu', 'cuda', 'tpu')
EXTRA_HINT = ("needs the 'export' extra: pip install -e .[export] "
              '(requirements-export.txt)')
# Seed and batch of the fixed parity batch (dynamic exports use 2 images).
PARITY_SEED = 0
# Where ``--calibration digits`` prepares the bundled digits (train.py's
# default data_dir).
DIGITS_DATA_DIR = './data/tfds'
DYNAMIC_PARITY_BATCH = 2


class ExportError(ValueError):
  """A user mistake: bad format, path, checkpoint or calibration data."""


@dataclasses.dataclass
class Exportable:
  """A model ready to export.

  Attributes:
    name: registered model name.
    num_classes: logits per image.
    in_chans: input channels ``C``.
    image_size: exported spatial size ``S``.
    batch: batch size, or ``None`` for a symbolic batch.
    fn: ``images (N, S, S, C) float32 -> logits (N, num_classes)``; the
      folded, deploy-form eval model with its weights as constants.
    reference: the same map computed by the plain Flax model (training form
      for GhostNetV3, BatchNorm not folded): what parity is measured against.
    preprocessing: :func:`eval_lib.preprocessing_record` of the model's eval
      preprocessing.
    checkpoint: the checkpoint path, ``None`` for random weights.
    class_names_source: where class names come from (``'checkpoint'``,
      ``'imagenet'``) or ``None``.
    params: the folded deploy-form variables ``fn`` closes over.
    apply: ``(params, images) -> logits``; ``fn(x) == apply(params, x)``.
      Writers that keep the weights apart from the graph (orbax-export's
      ``JaxModule``) use this pair.
  """
  name: str
  num_classes: int
  in_chans: int
  image_size: int
  batch: int | None
  fn: Callable[[jax.Array], jax.Array]
  reference: Callable[[jax.Array], jax.Array]
  preprocessing: dict
  checkpoint: str | None
  class_names_source: str | None
  params: Any = None
  apply: Callable[[Any, jax.Array], jax.Array] | None = None

  def input_shape(self) -> tuple[int | None, int, int, int]:
    return (self.batch, self.image_size, self.image_size, self.in_chans)

  def parity_batch(self) -> np.ndarray:
    """The fixed float32 batch parity is measured on, ``(N, S, S, C)``."""
    n = self.batch or DYNAMIC_PARITY_BATCH
    rng = np.random.default_rng(PARITY_SEED)
    return rng.standard_normal(
        (n, self.image_size, self.image_size, self.in_chans)).astype(np.float32)


def _deploy_model(name: str, variables, num_classes: int, model_kwargs: dict):
  """(module, variables) in deploy form: V3 re-parameterised, fp32."""
  kwargs = {k: v for k, v in model_kwargs.items()
            if k not in ('dtype', 'conv_impl', 'deploy')}
  if registry.get_entry(name).family == 'ghostnetv3':
    from ghostnet_jax import ghostnetv3  # pylint: disable=g-import-not-at-top
    variables = ghostnetv3.reparameterize(
        name, variables, num_classes=num_classes, **kwargs)
    kwargs['deploy'] = True
  model = registry.create_model(name, num_classes=num_classes, **kwargs)
  return model, variables


def prepare(*, checkpoint: str | None = None, model: str | None = None,
            batch: int | None = 1, image_size: int | None = None,
            seed: int = 0, variables=None, num_classes: int = 1000
            ) -> Exportable:
  """Loads (or randomly initialises) a model and builds its deploy function.

  Args:
    checkpoint: anything :func:`ghostnet_jax.loading.load_checkpoint` reads; ``None``
      means ``variables`` if given, else random weights for ``model``.
    model: registered name (required without ``checkpoint``).
    batch: exported batch size, ``None`` for a symbolic one.
    image_size: exported size; default the model's eval input size.
    seed: initialisation seed for random weights.
    variables: explicit training-form variables of ``model`` (tests).
    num_classes: classifier outputs of random / explicit variables.

  Raises:
    ExportError: unknown model, no model, bad batch or size.
    FileNotFoundError, convert.CheckpointError: as ``load_checkpoint``.
  """
  from ghostnet_jax import eval_lib, loading  # pylint: disable=g-import-not-at-top
  if batch is not None and batch < 1:
    raise ExportError(f'--batch must be a positive integer or "dynamic"; '
                      f'got {batch}.')
  if image_size is not None and image_size < 8:
    raise ExportError(f'--image-size must be >= 8; got {image_size}.')
  if model is not None:
    try:
      registry.get_entry(model)
    except (KeyError, ValueError) as e:
      raise ExportError(str(e).strip('"')) from e
  class_names_source = None
  model_kwargs: dict = {}
  if checkpoint is not None:
    loaded = loading.load_checkpoint(checkpoint, model=model)
    name, num_classes = loaded.model, loaded.num_classes
    variables = loaded.variables
    model_kwargs = dict(loaded.model_kwargs)
    preprocess_name, config = eval_lib.resolve_preprocessing(loaded)
    if loaded.class_names and len(loaded.class_names) == num_classes:
      class_names_source = 'checkpoint'
    elif num_classes == NUM_IMAGENET_CLASSES:
      class_names_source = 'imagenet'
  else:
    if model is None:
      raise ExportError('Give --checkpoint, or --model to export random '
                        'weights.')
    name = model
    entry = registry.get_entry(name)
    preprocess_name = entry.default_preprocess
    config = registry.get_eval_config(name, preprocess_name)
    if num_classes == NUM_IMAGENET_CLASSES:
      class_names_source = 'imagenet'
  train_model = registry.create_model(
      name, num_classes=num_classes,
      **{k: v for k, v in model_kwargs.items() if k != 'dtype'})
  in_chans = getattr(train_model, 'in_chans', 3)
  size = int(image_size or config.input_size)
  if variables is None:
    x0 = jnp.zeros((1, size, size, in_chans), jnp.float32)
    variables = jax.jit(train_model.init)(jax.random.PRNGKey(seed), x0)
  deploy_model, deploy_vars = _deploy_model(name, variables, num_classes,
                                            model_kwargs)
  folded, paths = inference.fold_batchnorm(deploy_model, deploy_vars,
                                           image_size=size)
  folded = jax.tree_util.tree_map(np.asarray, folded)

  def apply(params, images):
    return inference.folded_apply(deploy_model, params, paths, images)

  def fn(images):
    return apply(folded, images)

  def reference(images):
    return train_model.apply(variables, images, train=False)

  return Exportable(
      name=name, num_classes=num_classes, in_chans=in_chans, image_size=size,
      batch=batch, fn=fn, reference=jax.jit(reference),
      preprocessing=dict(
          eval_lib.preprocessing_record(preprocess_name, config),
          input_size=size),
      checkpoint=None if checkpoint is None else os.fspath(checkpoint),
      class_names_source=class_names_source, params=folded, apply=apply)


def relative_diff(a, b) -> tuple[float, float]:
  """``(max |a - b|, max |a - b| / max |b|)``."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  diff = float(np.max(np.abs(a - b)))
  return diff, diff / max(float(np.max(np.abs(b))), 1e-30)


# --------------------------------------------------------------- StableHLO


def export_stablehlo(ex: Exportable,
                     platforms: Sequence[str] = STABLEHLO_PLATFORMS):
  """``jax.export.Exported`` of ``ex.fn`` for ``platforms``.

  The batch is symbolic (``'b'``) when ``ex.batch`` is None. Traced with the
  pure-XLA CPU convolutions, so no lowering holds a custom call.
  """
  from jax import export  # pylint: disable=g-import-not-at-top
  shape = ex.input_shape()
  if ex.batch is None:
    (b,) = export.symbolic_shape('b', constraints=('b >= 1',))
    shape = (b,) + shape[1:]
  spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  fn = ex.fn
  with ops.auto_on_cpu('xla'):
    # A fresh jit: the choice of CPU lowering is made while tracing.
    return export.export(jax.jit(lambda x: fn(x)),
                         platforms=tuple(platforms))(spec)


def load_stablehlo(path: str) -> Callable[[Any], jax.Array]:
  """``images -> logits`` from a serialized artifact (no model code)."""
  from jax import export  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    exp = export.deserialize(bytearray(f.read()))
  return exp.call


def _write_stablehlo(ex: Exportable, tmp_path: str, **_) -> dict:
  exp = export_stablehlo(ex)
  with open(tmp_path, 'wb') as f:
    f.write(exp.serialize())
  out = load_stablehlo(tmp_path)(ex.parity_batch())
  return {'outputs': np.asarray(out),
          'info': {'platforms': list(exp.platforms),
                   'calling_convention_version':
                       exp.calling_convention_version}}


# -------------------------------------------------------------------- ONNX


def _require(module: str):
  try:
    return __import__(module, fromlist=['_'])
  except ImportError as e:
    raise ExportError(f'{module} is not installed: this format '
                      f'{EXTRA_HINT}. ({e})') from e


def export_onnx(ex: Exportable, path: str, opset: int = 17):
  """Writes ``ex.fn`` as an ONNX model (jax2onnx) to ``path``.

  The input is ``images`` ``(N, S, S, C)`` float32 (``N`` symbolic when
  ``ex.batch`` is None), the output ``logits``.
  """
  jax2onnx = _require('jax2onnx')
  batch = 'N' if ex.batch is None else ex.batch
  shape = (batch,) + ex.input_shape()[1:]
  fn = ex.fn
  onnx = _require('onnx')
  with ops.auto_on_cpu('lax'):
    jax2onnx.to_onnx(lambda x: fn(x), [shape], model_name=ex.name,
                     opset=opset, return_mode='file', output_path=path)
  # jax2onnx may put large tensors in side files; make one self-contained
  # file (the models here are far below protobuf's 2 GB limit).
  proto = onnx.load(path, load_external_data=True)
  onnx.save_model(proto, path, save_as_external_data=False)
  onnx.checker.check_model(path)


def run_onnx(path: str, images: np.ndarray, threads: int | None = None):
  """Logits of an ONNX file under ONNX Runtime (CPU)."""
  ort = _require('onnxruntime')
  opts = ort.SessionOptions()
  if threads:
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
  sess = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
  name = sess.get_inputs()[0].name
  return sess.run(None, {name: np.asarray(images, np.float32)})[0]


def _write_onnx(ex: Exportable, tmp_path: str, **_) -> dict:
  export_onnx(ex, tmp_path)
  return {'outputs': run_onnx(tmp_path, ex.parity_batch()),
          'info': {'runtime': 'onnxruntime'}}


# ------------------------------------------------- TF SavedModel / TFLite


def export_savedmodel(ex: Exportable, path: str,
                      platforms: Sequence[str] = ('cpu',)) -> None:
  """Writes ``ex`` as a TF SavedModel through orbax-export.

  Signature ``serving_default``: ``images`` ``(N, S, S, C)`` float32 ->
  ``logits`` (``N`` symbolic when ``ex.batch`` is None). orbax-export's
  ``JaxModule`` holds the folded weights as (non-trainable) ``tf.Variable``s
  and converts ``ex.apply`` with jax2tf (native serialization: the graph is
  StableHLO in an ``XlaCallModule`` lowered for ``platforms``);
  ``ExportManager`` writes it with one ``ServingConfig``.
  """
  tf = _require('tensorflow')
  oex = _require('orbax.export')
  if ex.apply is None:
    raise ExportError('This Exportable has no (params, apply) pair; build '
                      'it with export.prepare.')
  spec = tf.TensorSpec(ex.input_shape(), tf.float32, name='images')
  # Plain convolutions: the TFLite converter maps them to its CONV_2D /
  # DEPTHWISE_CONV_2D kernels (the XLA:CPU rewrites would not convert).
  # jax2tf traces when the serving function is built and saved: both stay
  # inside the block.
  with ops.auto_on_cpu('lax'):
    module = oex.JaxModule(
        ex.params, ex.apply, trainable=False,
        input_polymorphic_shape='(b, ...)' if ex.batch is None else None,
        jax2tf_kwargs={'with_gradient': False,
                       'native_serialization_platforms': tuple(platforms)},
        jit_compile=False)
    serving = oex.ServingConfig(
        signature_key='serving_default', input_signature=[spec],
        tf_postprocessor=lambda logits: {'logits': logits})
    oex.ExportManager(module, [serving]).save(path)


def run_savedmodel(path: str, images: np.ndarray) -> np.ndarray:
  tf = _require('tensorflow')
  sig = tf.saved_model.load(path).signatures['serving_default']
  return sig(images=tf.constant(np.asarray(images, np.float32)))[
      'logits'].numpy()


def calibration_images(source: str, ex: Exportable, count: int = 64
                       ) -> np.ndarray:
  """Normalised calibration images ``(count, S, S, C)`` float32.

  ``source``: ``'digits'`` (the bundled digits), a tfds ``NAME[:SPLIT]``, or
  a folder of image files; resized and normalised as the sidecar says.
  """
  from ghostnet_jax import classify  # pylint: disable=g-import-not-at-top
  size, c = ex.image_size, ex.in_chans
  mean = np.asarray(ex.preprocessing['mean'], np.float32)
  std = np.asarray(ex.preprocessing['std'], np.float32)
  if os.path.isdir(source):
    files = sorted(f for f in os.listdir(source)
                   if f.lower().endswith(('.png', '.jpg', '.jpeg', '.bmp')))
    if not files:
      raise ExportError(f'--calibration folder {source} has no images.')
    images = []
    for f in files[:count]:
      img = classify.load_image(os.path.join(source, f))
      images.append(np.asarray(jax.image.resize(
          img.astype(np.float32) / 255.0, (size, size, img.shape[-1]),
          'bilinear')))
    x = np.stack(images)
  else:
    from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    name, _, split = source.partition(':')
    data_dir = None
    if name == 'digits':
      from ghostnet_jax.datasets import digits  # pylint: disable=g-import-not-at-top
      data_dir = DIGITS_DATA_DIR
      name, split = digits.prepare_digits(data_dir), split or 'train'
    pre = ex.preprocessing
    try:
      it = input_pipeline.eval_iterator(
          dataset=name, data_dir=data_dir, split=split or 'train',
          global_batch_size=count, image_size=size,
          crop_fraction=pre['crop_fraction'],
          interpolation=pre['interpolation'], mean=pre['mean'],
          std=pre['std'], process_index=0, process_count=1)
      batch = next(iter(it))
    except ValueError as e:
      raise ExportError(f'--calibration {source!r} is neither an image '
                        f'folder nor a prepared tfds dataset: {e}') from e
    return np.asarray(batch['image'])[np.asarray(batch['mask']) > 0]
  if x.shape[-1] == 1 and c == 3:
    x = np.repeat(x, 3, axis=-1)
  if x.ndim != 4 or x.shape[-1] != c:
    raise ExportError(f'--calibration {source!r} gives images of shape '
                      f'{x.shape[1:]}; the model takes {c} channels.')
  return ((x - mean) / std).astype(np.float32)


def export_tflite(ex: Exportable, path: str, *, quantize: str | None = None,
                  calibration: np.ndarray | None = None) -> None:
  """Writes a ``.tflite`` (TFLite converter, from a SavedModel).

  ``quantize='int8'``: post-training full-integer quantization of weights
  and activations, calibrated on ``calibration`` ``(M, S, S, C)``; input and
  output stay float32.
  """
  tf = _require('tensorflow')
  if quantize == 'int8':
    if calibration is None:
      raise ExportError('int8 needs calibration images.')
    want = ex.input_shape()[1:]
    if tuple(calibration.shape[1:]) != tuple(want):
      raise ExportError(f'Calibration images have shape '
                        f'{calibration.shape[1:]}; expected {want}.')
  with tempfile.TemporaryDirectory() as tmp:
    sm = os.path.join(tmp, 'saved_model')
    export_savedmodel(ex, sm)
    converter = tf.lite.TFLiteConverter.from_saved_model(sm)
    if quantize == 'int8':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]

      def representative():
        for img in calibration:
          yield [img[None]]

      converter.representative_dataset = representative
      converter.target_spec.supported_ops = [
          tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    data = converter.convert()
  with open(path, 'wb') as f:
    f.write(data)


def run_tflite(path: str, images: np.ndarray, threads: int | None = None
               ) -> np.ndarray:
  """Logits of a ``.tflite`` under the LiteRT interpreter."""
  litert = _require('ai_edge_litert.interpreter')
  interp = litert.Interpreter(model_path=path, num_threads=threads)
  inp = interp.get_input_details()[0]
  images = np.asarray(images, np.float32)
  if tuple(inp['shape']) != images.shape:
    interp.resize_tensor_input(inp['index'], images.shape)
  interp.allocate_tensors()
  interp.set_tensor(inp['index'], images)
  interp.invoke()
  return interp.get_tensor(interp.get_output_details()[0]['index'])


def _write_savedmodel(ex: Exportable, tmp_path: str, **_) -> dict:
  export_savedmodel(ex, tmp_path)
  return {'outputs': run_savedmodel(tmp_path, ex.parity_batch()),
          'info': {'converter': 'orbax-export (jax2tf native serialization)',
                   'signature': 'serving_default: images -> logits'}}


def _write_tflite(ex: Exportable, tmp_path: str, quantize=None,
                  calibration=None) -> dict:
  calib = None
  if quantize == 'int8':
    calib = calibration_images(calibration, ex)
  export_tflite(ex, tmp_path, quantize=quantize, calibration=calib)
  return {'outputs': run_tflite(tmp_path, ex.parity_batch()),
          'info': {'runtime': 'ai-edge-litert', 'quantize': quantize,
                   'calibration': calibration}}


# ------------------------------------------------------------------ driver


_WRITERS = {
    'stablehlo': _write_stablehlo,
    'onnx': _write_onnx,
    'savedmodel': _write_savedmodel,
    'tflite': _write_tflite,
}


def _check_output(output: str, overwrite: bool) -> None:
  if not output:
    raise ExportError('--output is empty.')
  parent = os.path.dirname(os.path.abspath(output)) or '.'
  if not os.path.isdir(parent):
    raise ExportError(f'The directory of --output does not exist: {parent}')
  if os.path.lexists(output) and not overwrite:
    raise ExportError(f'{output} already exists; pass --overwrite to '
                      'replace it.')


def _replace(tmp: str, final: str) -> None:
  """Moves ``tmp`` (file or directory) to ``final``, replacing it."""
  if os.path.isdir(final) and not os.path.islink(final):
    trash = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(final)),
                             prefix='.old-')
    os.replace(final, os.path.join(trash, 'old'))
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    os.replace(tmp, final)


def sidecar(ex: Exportable, fmt: str, output: str, diff: float,
            rel: float, extra: dict) -> dict:
  """The JSON written beside an artifact."""
  return {
      'format': fmt,
      'artifact': os.path.basename(output),
      'model': ex.name,
      'num_classes': ex.num_classes,
      'input': {'shape': list(ex.input_shape()), 'layout': 'NHWC',
                'dtype': 'float32', 'normalized': True,
                'batch': 'dynamic' if ex.batch is None else ex.batch},
      'output': {'shape': [ex.batch, ex.num_classes], 'kind': 'logits'},
      'preprocessing': ex.preprocessing,
      'class_names_source': ex.class_names_source,
      'checkpoint': ex.checkpoint,
      'random_weights': ex.checkpoint is None,
      'package_version': ghostnet_jax.__version__,
      'parity': {'max_abs_diff': diff, 'max_abs_diff_over_max_logit': rel,
                 'batch_seed': PARITY_SEED, 'against': 'flax eval model'},
      **extra,
  }


def export(ex: Exportable, fmt: str, output: str, *, overwrite: bool = False,
           quantize: str | None = None, calibration: str | None = None
           ) -> dict:
  """Writes ``ex`` as ``fmt`` to ``output`` plus ``output + '.json'``.

  Returns the sidecar dict. Raises :class:`ExportError` for bad arguments;
  on any failure nothing is left at ``output``.
  """
  if fmt not in FORMATS:
    raise ExportError(f'Unknown format {fmt!r}; expected one of {FORMATS}.')
  if fmt not in _WRITERS:
    raise ExportError(f'Format {fmt!r} is not available in this version.')
  _check_output(output, overwrite)
  parent = os.path.dirname(os.path.abspath(output))
  tmp_dir = tempfile.mkdtemp(dir=parent, prefix='.export-')
  try:
    tmp_path = os.path.join(tmp_dir, os.path.basename(output))
    result = _WRITERS[fmt](ex, tmp_path, quantize=quantize,
                           calibration=calibration)
    expected = np.asarray(ex.reference(ex.parity_batch()))
    diff, rel = relative_diff(result['outputs'], expected)
    meta = sidecar(ex, fmt, output, diff, rel, result.get('info', {}))
    meta_tmp = tmp_path + '.json'
    with open(meta_tmp, 'w') as f:
      json.dump(meta, f, indent=2)
    _replace(tmp_path, output)
    os.replace(meta_tmp, output + '.json')
    return meta
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


# -------------------------------------------------------------------- CLI


def _batch_arg(value: str) -> int | None:
  if value == 'dynamic':
    return None
  try:
    n = int(value)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(
        f'expected a positive integer or "dynamic", got {value!r}')
  return n


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m ghostnet_jax.export',
      description='Export a GhostNet-family model (eval mode, BatchNorm '
      'folded) to StableHLO, TF SavedModel, TFLite or ONNX.')
  p.add_argument('--checkpoint', help='PyTorch file, converted directory or '
                 'train.py workdir (as eval.py); omit for random weights.')
  p.add_argument('--model', help='registered model name')
  p.add_argument('--format', required=True, choices=FORMATS)
  p.add_argument('--output', required=True, help='artifact path')
  p.add_argument('--batch', type=_batch_arg, default=1,
                 help='batch size, or "dynamic" (default 1)')
  p.add_argument('--image-size', type=int, default=None,
                 help="input size (default: the model's eval size)")
  p.add_argument('--quantize', choices=('int8',), default=None,
                 help='post-training quantization (tflite only)')
  p.add_argument('--calibration', default=None,
                 help='int8 calibration data: tfds NAME[:SPLIT], an image '
                 'folder, or "digits"')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing output')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from ghostnet_jax import convert, eval_lib  # pylint: disable=g-import-not-at-top
  try:
    if args.quantize and args.format != 'tflite':
      raise ExportError('--quantize int8 applies to --format tflite only.')
    if args.quantize and not args.calibration:
      raise ExportError('--quantize int8 needs --calibration (a tfds '
                        'dataset[:split], an image folder, or "digits").')
    _check_output(args.output, args.overwrite)
    if args.format not in _WRITERS:
      raise ExportError(f'Format {args.format!r} is not available in this '
                        'version.')
    ex = prepare(checkpoint=args.checkpoint, model=args.model,
                 batch=args.batch, image_size=args.image_size)
    if ex.checkpoint is None:
      print(f'note: no --checkpoint: exporting RANDOM weights of {ex.name}.')
    meta = export(ex, args.format, args.output, overwrite=args.overwrite,
                  quantize=args.quantize, calibration=args.calibration)
  except (ExportError, FileNotFoundError, convert.CheckpointError,
          eval_lib.EvalError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {args.output} ({args.format}, {ex.name}, input '
        f'{meta["input"]["shape"]} NHWC float32) and {args.output}.json; '
        f'max|diff| vs Flax {meta["parity"]["max_abs_diff"]:.3g} '
        f'(relative {meta["parity"]["max_abs_diff_over_max_logit"]:.3g})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
