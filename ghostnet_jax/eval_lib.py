"""Evaluation of GhostNet checkpoints on tfds datasets, and photo classification.

The library behind ``eval.py``. Three kinds of checkpoint are read by
:func:`load_checkpoint`:

* a PyTorch file (``.pth`` / ``.pth.tar``, official or timm layout),
  converted on the fly by :mod:`ghostnet_jax.convert`; the model is
  ``model=`` or, when omitted, the one registered architecture whose keys and
  shapes the file matches exactly; the number of classes is read off the
  classifier;
* a converted orbax directory (``python -m ghostnet_jax.convert``): model and
  classes from its metadata;
* a ``train.py`` workdir: the best (or latest) checkpoint, with model,
  dataset, split, classes and preprocessing taken from the run's config.

:func:`evaluate` runs one pass over a tfds split, sharded over every device
of every process: a ``Mesh`` over ``jax.devices()`` with one ``'data'``
axis, the global batch rounded up to a multiple of the device count and the
last batch padded with masked rows, so every example counts exactly once.
Top-1 / top-5 are computed on device as integer counts of hits (``lax.top_k``,
ties broken towards the lower class index) and reported in percent.

:func:`classify_images` classifies image files (any format PIL reads; grey,
palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB by
:func:`load_image`) and returns the top-k classes with their softmax
probabilities.

Python::

    from ghostnet_jax import eval_lib
    results = eval_lib.evaluate('state_dict_73.98.pth', model='ghostnet_100',
                                dataset='imagenet2012', data_dir='~/tfds')
    print(results['top1'], results['top5'], results['num_examples'])
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import convert, registry
from ghostnet_jax.class_names import NUM_IMAGENET_CLASSES, imagenet_classes

DATA_AXIS = 'data'
DEFAULT_BATCH_SIZE = 256
DEFAULT_TOP_K = 5
# The preprocessing of a train.py workdir's own evaluation.
WORKDIR_PREPROCESS = 'workdir'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


class EvalError(ValueError):
  """A problem with what eval was asked to do (a user mistake)."""


class ImageError(EvalError):
  """An image file that cannot be read; ``path`` names it."""

  def __init__(self, path: str, problem: str):
    self.path = path
    self.problem = problem
    super().__init__(f'{path}: {problem}')


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedCheckpoint:
  """Variables of a checkpoint and what is known about them.

  Attributes:
    kind: ``'torch'``, ``'converted'`` or ``'workdir'``.
    path: the checkpoint path as given.
    model: registered model name.
    num_classes: classifier outputs.
    variables: ``{'params': ..., 'batch_stats': ...}``.
    ema: whether these are EMA weights (``None``: unknown, e.g. a converted
      checkpoint whose conversion did not record it).
    model_kwargs: extra :func:`ghostnet_jax.create_model` arguments (a
      workdir's dtype, conv_impl and model overrides).
    class_names: names of the classes, when the checkpoint knows them.
    dataset, split, data_dir: a workdir's evaluation data.
    eval_config: a workdir's evaluation preprocessing.
    step: a workdir's training step.
    run_metrics: a workdir checkpoint's metrics recorded by the trainer.
    metadata: anything else the checkpoint recorded.
    batch_size: a workdir's evaluation batch size.
  """
  kind: str
  path: str
  model: str
  num_classes: int
  variables: dict
  ema: bool | None = None
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  class_names: tuple[str, ...] | None = None
  dataset: str | None = None
  split: str | None = None
  data_dir: str | None = None
  eval_config: registry.EvalConfig | None = None
  step: int | None = None
  run_metrics: dict | None = None
  metadata: dict = dataclasses.field(default_factory=dict)
  batch_size: int | None = None

  def create_model(self, dtype: Any = None):
    """The Flax module these variables belong to."""
    kwargs = dict(self.model_kwargs)
    if dtype is not None:
      kwargs['dtype'] = dtype
    return registry.create_model(self.model, num_classes=self.num_classes,
                                 **kwargs)


def _layout(model: str, num_classes: int = NUM_IMAGENET_CLASSES) -> dict:
  # Always with num_classes=: torch_layout caches by its arguments, and the
  # converter calls it that way.
  return convert.torch_layout(model, num_classes=num_classes)


def _classes_of_state_dict(sd: Mapping[str, np.ndarray],
                           model: str) -> int | None:
  """Classifier outputs of a cleaned state_dict of ``model``.

  Compared with the 1000-class layout, only the classifier (at most its
  weight and bias) may differ, and its new output count is read off the
  tensors' first dimension. ``None`` when more than that differs.
  """
  layout = _layout(model)
  differ = [k for k, v in layout.items()
            if k in sd and tuple(np.shape(sd[k])) != convert._torch_shape(v[2])]  # pylint: disable=protected-access
  if not differ:
    return NUM_IMAGENET_CLASSES
  outputs = {int(np.shape(sd[k])[0]) for k in differ if np.ndim(sd[k]) >= 1}
  if len(differ) > 2 or len(outputs) != 1:
    return None
  return outputs.pop()


def _matches_exactly(sd: Mapping[str, np.ndarray], model: str,
                     num_classes: int) -> bool:
  layout = _layout(model, num_classes)
  if set(layout) != set(sd):
    return False
  return all(tuple(np.shape(sd[k])) == convert._torch_shape(v[2])  # pylint: disable=protected-access
             for k, v in layout.items())


def infer_torch_model(state_dict: Mapping[str, Any], source: str) -> str:
  """The one registered model whose layout a state_dict matches exactly.

  Raises:
    EvalError: when no model or several models match (then ``--model`` has
      to say which).
  """
  matches, close = [], []
  for name in registry.list_models():
    entry = registry.get_entry(name)
    sd = convert.clean_state_dict(state_dict, entry.torch_key_map)
    try:
      default_layout = _layout(name)
    except Exception:  # pylint: disable=broad-except  (a model that cannot build)
      continue
    if set(sd) != set(default_layout):
      overlap = len(set(sd) & set(default_layout)) / max(
          len(set(sd) | set(default_layout)), 1)
      if overlap > 0.5:
        close.append(name)
      continue
    num_classes = _classes_of_state_dict(sd, name)
    if num_classes and _matches_exactly(sd, name, num_classes):
      matches.append(name)
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise EvalError(f'{source} fits several models ({", ".join(matches)}); '
                    'pass --model to say which.')
  hint = (f' It is close to {", ".join(close)} but does not match it exactly.'
          if close else '')
  raise EvalError(f'Cannot tell which model {source} holds: its keys and '
                  f'shapes match no registered model.{hint} Pass --model '
                  f'NAME (one of {", ".join(registry.list_models())}); the '
                  'error then lists every mismatch.')


def _top_level_has_ema(obj: Any) -> bool:
  return isinstance(obj, Mapping) and any(
      isinstance(obj.get(k), Mapping) for k in convert.EMA_KEYS)


def _load_torch(path: str, model: str | None, ema: bool | None,
                allow_pickle: bool) -> LoadedCheckpoint:
  obj = convert.read_torch_file(path, allow_pickle=allow_pickle)
  state_dict = convert.select_state_dict(obj, ema=ema, source=path)
  if model is None:
    model = infer_torch_model(state_dict, path)
  entry = registry.get_entry(model)
  num_classes = _classes_of_state_dict(
      convert.clean_state_dict(state_dict, entry.torch_key_map),
      model) or NUM_IMAGENET_CLASSES
  try:
    variables = convert.state_dict_to_variables(
        state_dict, model, source=path, num_classes=num_classes)
  except convert.CheckpointError as e:
    try:
      fits = infer_torch_model(state_dict, path)
    except EvalError:
      raise e from None
    raise convert.CheckpointError(
        f'{e}\n{path} is a {fits} checkpoint: pass --model {fits} (or leave '
        '--model out).') from None
  return LoadedCheckpoint(
      kind='torch', path=path, model=model, num_classes=num_classes,
      variables=variables, ema=_top_level_has_ema(obj) and ema is not False,
      class_names=(imagenet_classes() if num_classes == NUM_IMAGENET_CLASSES
                   else None))


def _load_converted(path: str, model: str | None,
                    ema: bool | None) -> LoadedCheckpoint:
  variables, metadata = ckpt_lib.restore_converted(path)
  saved_model = metadata.get('model')
  num_classes = int(metadata.get('num_classes', NUM_IMAGENET_CLASSES))
  if model is None:
    if not saved_model:
      raise EvalError(f'{path} does not record its model; pass --model.')
    registry.get_entry(saved_model)
    model = saved_model
  saved_ema = metadata.get('ema')
  if ema is not None and saved_ema is not None and bool(saved_ema) != ema:
    raise EvalError(
        f'{path} holds the {"EMA" if saved_ema else "regular"} weights only '
        f'(chosen at conversion), but {"--ema" if ema else "--no-ema"} asked '
        'for the others; convert the PyTorch file again with the other '
        'choice.')
  if ema is not None and saved_ema is None:
    raise EvalError(
        f'{path} holds one set of weights, and its conversion did not record '
        'whether they are EMA weights; --ema/--no-ema choose among the '
        'weights of a PyTorch file or a train.py workdir. Drop the option, or '
        'convert again with --ema or --no-ema.')
  convert.check_variables(variables, model, num_classes, source=path)
  names = metadata.get('class_names')
  if names is not None:
    names = tuple(str(n) for n in names)
  elif num_classes == NUM_IMAGENET_CLASSES:
    names = imagenet_classes()
  return LoadedCheckpoint(
      kind='converted', path=path, model=model, num_classes=num_classes,
      variables=variables, ema=saved_ema, class_names=names,
      metadata=dict(metadata))


# ---------------------------------------------------------------- workdirs
# Everything eval knows about train.py's workdir layout is in this section.

WORKDIR_CONFIG = 'config.json'
WORKDIR_CHECKPOINTS = 'checkpoints'


def is_workdir(path: str) -> bool:
  """Whether ``path`` looks like a ``train.py`` workdir."""
  return (os.path.isdir(path)
          and os.path.exists(os.path.join(path, WORKDIR_CONFIG))
          and os.path.isdir(os.path.join(path, WORKDIR_CHECKPOINTS)))


def _freeze(value):
  """JSON values -> hashable ones (lists to tuples), for module fields."""
  if isinstance(value, Mapping):
    return {k: _freeze(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _workdir_dataset(config, meta: Mapping) -> str:
  """The tfds name of a run's dataset (``'digits'`` is the bundled one)."""
  dataset = meta.get('dataset') or config.get('dataset')
  if dataset == 'digits':
    from ghostnet_jax.datasets import DIGITS_NAME  # pylint: disable=g-import-not-at-top
    dataset = f'{DIGITS_NAME}/32'
  return dataset


def _load_workdir(path: str, model: str | None, ema: bool | None,
                  which: str | int) -> LoadedCheckpoint:
  """A train.py workdir: variables, and the run's model, data and
  preprocessing from its config."""
  restore = getattr(ckpt_lib, 'restore_workdir', None)
  if restore is None:
    raise EvalError(f'{path} is a train.py workdir, but this version of '
                    'ghostnet_jax cannot restore workdirs.')
  restored = restore(path, which=which)
  config, meta = restored['config'], dict(restored.get('meta') or {})
  run_model = meta.get('model') or config.get('model')
  if model is not None and model != run_model:
    raise EvalError(f'{path} is a {run_model} run, but --model {model} was '
                    'given; leave --model out for a workdir.')
  model = run_model
  registry.get_entry(model)
  ema_variables = restored.get('ema_variables')
  if ema is True and ema_variables is None:
    raise EvalError(f'EMA weights requested, but the run in {path} kept no '
                    'EMA (config.ema_decay was 0).')
  use_ema = ema_variables is not None and ema is not False
  variables = ema_variables if use_ema else restored['variables']
  num_classes = int(meta.get('num_classes') or config.get('num_classes'))
  overrides = config.get('model_overrides') or {}
  if hasattr(overrides, 'to_dict'):
    overrides = overrides.to_dict()
  kwargs = _freeze(dict(overrides))
  if config.get('dtype'):
    kwargs['dtype'] = _dtype(config.get('dtype'))
  if config.get('conv_impl'):
    kwargs['conv_impl'] = config.get('conv_impl')
  convert.check_variables(variables, model, num_classes, source=path,
                  **dict((k, v) for k, v in kwargs.items() if k != 'dtype'))
  defaults = registry.get_eval_config(model)
  eval_config = registry.EvalConfig(
      input_size=int(config.get('image_size') or defaults.input_size),
      crop_fraction=float(config.get('eval_crop_fraction')
                          or defaults.crop_fraction),
      interpolation=config.get('interpolation') or defaults.interpolation,
      mean=tuple(config.get('mean') or defaults.mean),
      std=tuple(config.get('std') or defaults.std))
  names = meta.get('class_names')
  data_dir = config.get('data_dir') or None
  return LoadedCheckpoint(
      kind='workdir', path=path, model=model, num_classes=num_classes,
      variables=variables, ema=use_ema, model_kwargs=kwargs,
      class_names=tuple(str(n) for n in names) if names else None,
      dataset=_workdir_dataset(config, meta),
      split=config.get('eval_split') or None,
      data_dir=os.fspath(data_dir) if data_dir else None,
      eval_config=eval_config, step=restored.get('step'),
      run_metrics=restored.get('metrics'), metadata=meta,
      batch_size=config.get('eval_batch_size') or None)


def load_checkpoint(path: str | os.PathLike, *, model: str | None = None,
                    ema: bool | None = None, which: str | int = 'best',
                    allow_pickle: bool = False) -> LoadedCheckpoint:
  """Reads any checkpoint eval understands.

  Args:
    path: a PyTorch file, a converted orbax directory or a train.py workdir.
    model: registered model name; required for a PyTorch file that fits
      several models, checked against the others.
    ema: ``None`` uses EMA weights when the checkpoint has them, ``True``
      requires them, ``False`` uses the regular weights.
    which: for a workdir, ``'best'``, ``'latest'`` or a step.
    allow_pickle: let ``torch.load`` unpickle arbitrary objects.

  Raises:
    FileNotFoundError: nothing at ``path``.
    convert.CheckpointError: the weights do not fit the model (the message
      lists every missing, unexpected and mis-shaped key), or a bad file.
    EvalError, ValueError: other user mistakes (unknown model, ...).
  """
  if model is not None:
    registry.get_entry(model)  # Unknown names fail before any file I/O.
  path = os.fspath(os.path.expanduser(os.fspath(path)))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Checkpoint not found: {path} (expected a PyTorch .pth file, a '
        'converted orbax directory or a train.py workdir).')
  if os.path.isdir(path):
    if is_workdir(path):
      return _load_workdir(path, model, ema, which)
    if ckpt_lib.is_converted_checkpoint(path):
      return _load_converted(path, model, ema)
    raise EvalError(
        f'{path} is a directory but neither a converted checkpoint (no '
        f'0/{ckpt_lib.VARIABLES}/ inside) nor a train.py workdir (no '
        'config.json and checkpoints/).')
  return _load_torch(path, model, ema, allow_pickle)


# ---------------------------------------------------------------------------
# Preprocessing choice
# ---------------------------------------------------------------------------

def resolve_preprocessing(checkpoint: LoadedCheckpoint,
                          preprocess: str | None = None,
                          image_size: int | None = None,
                          crop_fraction: float | None = None
                          ) -> tuple[str, registry.EvalConfig]:
  """The preprocessing to evaluate with: ``(name, EvalConfig)``.

  ``preprocess=None``: a workdir's own evaluation preprocessing
  (``'workdir'``), else the model's default preset. A preset name gives the
  model's registry settings under that preset. ``image_size`` and
  ``crop_fraction`` override either.
  """
  if preprocess is None and checkpoint.eval_config is not None:
    name, config = WORKDIR_PREPROCESS, checkpoint.eval_config
  else:
    name = preprocess or registry.get_entry(checkpoint.model).default_preprocess
    config = registry.get_eval_config(checkpoint.model, name)
  if image_size is not None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
        or image_size <= 0:
      raise EvalError(f'image_size must be a positive int, got {image_size!r}.')
    config = dataclasses.replace(config, input_size=image_size)
  if crop_fraction is not None:
    if not 0.0 < crop_fraction <= 1.0:
      raise EvalError(f'crop_fraction must be in (0, 1], got {crop_fraction}.')
    config = dataclasses.replace(config, crop_fraction=float(crop_fraction))
  return name, config


def preprocessing_record(name: str, config: registry.EvalConfig) -> dict:
  """The JSON description of a preprocessing."""
  return {'name': name, 'input_size': int(config.input_size),
          'crop_fraction': float(config.crop_fraction),
          'interpolation': config.interpolation,
          'mean': [float(m) for m in config.mean],
          'std': [float(s) for s in config.std]}


# ---------------------------------------------------------------------------
# Sharded computation
# ---------------------------------------------------------------------------

def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def round_batch_size(batch_size: int, mesh: Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh's device count."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
      or batch_size <= 0:
    raise EvalError(f'batch_size must be a positive int, got {batch_size!r}.')
  n = mesh.devices.size
  multiple = n * jax.process_count() // math.gcd(n, jax.process_count())
  return -(-batch_size // multiple) * multiple


def _replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _global_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Per-process rows -> one array sharded over the batch axis."""
  sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole value of ``x`` on this host (gathered across processes)."""
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def topk_hits(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example bool: ``labels`` among the top ``min(k, classes)`` logits
  (``lax.top_k``: ties go to the lower class index)."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return (top == labels[:, None]).any(-1)


@functools.lru_cache(maxsize=16)
def _make_eval_step(model, mesh: Mesh):
  """``(totals, variables, images, labels, mask) -> (totals, logits)``.

  ``totals`` is int32 ``[top-1 hits, top-5 hits, examples]`` summed over
  the global batch (rows with ``mask == 0`` count nowhere). Cached per
  (model, mesh), so repeated evaluations reuse the compiled step.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

  def step(totals, variables, images, labels, mask):
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    valid = mask > 0
    counts = jnp.stack([
        jnp.sum(topk_hits(logits, labels, 1) & valid, dtype=jnp.int32),
        jnp.sum(topk_hits(logits, labels, 5) & valid, dtype=jnp.int32),
        jnp.sum(valid, dtype=jnp.int32)])
    return totals + counts, logits

  return jax.jit(step, in_shardings=(replicated, replicated, batch, batch,
                                     batch),
                 out_shardings=(replicated, batch), donate_argnums=(0,))


def evaluate_model(model, variables: Mapping, *, dataset: str, split: str,
                   data_dir: str | None, eval_config: registry.EvalConfig,
                   num_classes: int, batch_size: int = DEFAULT_BATCH_SIZE,
                   mesh: Mesh | None = None, progress: bool = True,
                   return_logits: bool = False, worker_count: int = 0,
                   num_threads: int = 8, image_key: str | None = None,
                   label_key: str | None = None) -> dict:
  """One pass of ``model`` over a tfds split, sharded over ``mesh``.

  Args:
    model: a Flax module mapping NHWC images to ``(N, num_classes)`` logits.
    variables: its variables.
    dataset, split, data_dir: the tfds data.
    eval_config: preprocessing (size, crop fraction, interpolation, mean,
      std).
    num_classes: the model's outputs; must equal the dataset's classes.
    batch_size: global batch; rounded up to a multiple of the device count.
    mesh: default :func:`make_mesh` over all devices.
    progress: show a tqdm bar (process 0 only).
    return_logits: also return ``'logits'`` ``(N, classes)`` and
      ``'labels'`` ``(N,)`` numpy arrays of the real (unpadded) examples, in
      split order.
    worker_count: grain worker processes for decoding and preprocessing.
    num_threads: threads decoding and preprocessing (in each process), each
      preparing a whole local batch; as many batches are buffered.
    image_key, label_key: feature keys (defaults: ``'image'``, ``'label'``).

  Returns:
    ``{'top1': %, 'top5': %, 'num_examples', 'correct_top1',
    'correct_top5', 'images_per_second', 'eval_seconds',
    'compile_seconds', 'num_devices', 'global_batch_size'}``.
  """
  from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  mesh = make_mesh() if mesh is None else mesh
  info = input_pipeline.get_dataset_info(dataset, data_dir,
                                         image_key=image_key,
                                         label_key=label_key)
  if info.num_classes != num_classes:
    raise EvalError(
        f'The model has {num_classes} outputs but dataset {dataset!r} has '
        f'{info.num_classes} classes; evaluate a checkpoint trained for '
        'this dataset.')
  global_batch = round_batch_size(batch_size, mesh)
  it = input_pipeline.eval_iterator(
      dataset=dataset, data_dir=data_dir, split=split,
      global_batch_size=global_batch, image_size=eval_config.input_size,
      crop_fraction=eval_config.crop_fraction,
      interpolation=eval_config.interpolation, mean=eval_config.mean,
      std=eval_config.std, worker_count=worker_count,
      num_threads=num_threads, prefetch_batches=max(2, num_threads),
      image_key=info.image_key, label_key=info.label_key)
  num_batches = len(it)

  step = _make_eval_step(model, mesh)
  variables = _replicate(dict(variables), mesh)
  s = eval_config.input_size
  shapes = [((global_batch, s, s, 3), jnp.float32), ((global_batch,), jnp.int32),
            ((global_batch,), jnp.float32)]
  batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  t0 = time.perf_counter()
  compiled = step.lower(
      jax.ShapeDtypeStruct((3,), jnp.int32,
                           sharding=NamedSharding(mesh, PartitionSpec())),
      variables,
      *[jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
        for shape, dtype in shapes]).compile()
  compile_seconds = time.perf_counter() - t0

  totals = _replicate(jnp.zeros((3,), jnp.int32), mesh)
  all_logits, all_labels, all_masks = [], [], []
  bar = tqdm(total=num_batches, unit='batch', desc=f'{dataset}:{split}',
             disable=not progress or jax.process_index() != 0,
             dynamic_ncols=True)
  t0 = time.perf_counter()
  seen = 0
  try:
    for local in it:
      images = _global_array(local['image'], mesh)
      labels = _global_array(local['label'].astype(np.int32), mesh)
      mask = _global_array(local['mask'].astype(np.float32), mesh)
      totals, logits = compiled(totals, variables, images, labels, mask)
      if return_logits:
        all_logits.append(_to_host(logits))
        all_labels.append(_to_host(labels))
        all_masks.append(_to_host(mask))
      seen += int(local['mask'].sum())
      bar.update(1)
      elapsed = time.perf_counter() - t0
      if elapsed > 0:
        bar.set_postfix_str(f'{seen * jax.process_count() / elapsed:.1f} img/s',
                            refresh=False)
    top1, top5, count = (int(v) for v in _to_host(totals))
  finally:
    bar.close()
  seconds = time.perf_counter() - t0
  if count == 0:
    raise EvalError(f'Split {split!r} of {dataset!r} gave no examples.')
  results = {
      'top1': 100.0 * top1 / count,
      'top5': 100.0 * top5 / count,
      'num_examples': count,
      'correct_top1': top1,
      'correct_top5': top5,
      'images_per_second': count / seconds if seconds > 0 else None,
      'eval_seconds': seconds,
      'compile_seconds': compile_seconds,
      'num_devices': int(mesh.devices.size),
      'global_batch_size': global_batch,
  }
  if return_logits:
    keep = np.concatenate(all_masks) > 0
    results['logits'] = np.concatenate(all_logits)[keep]
    results['labels'] = np.concatenate(all_labels)[keep]
  return results


def _dtype(name: str | None):
  if name is None:
    return None
  try:
    return DTYPES[name]
  except KeyError:
    raise EvalError(f'Unknown dtype {name!r}; expected one of '
                    f'{sorted(DTYPES)}.') from None


def _as_loaded(checkpoint, **load_kwargs) -> LoadedCheckpoint:
  """``checkpoint`` itself if already loaded, else :func:`load_checkpoint`."""
  if isinstance(checkpoint, LoadedCheckpoint):
    return checkpoint
  return load_checkpoint(checkpoint, **load_kwargs)


def evaluate(checkpoint: str | os.PathLike | LoadedCheckpoint, *,
             model: str | None = None, dataset: str | None = None,
             split: str | None = None, data_dir: str | None = None,
             preprocess: str | None = None, image_size: int | None = None,
             crop_fraction: float | None = None,
             batch_size: int | None = None, ema: bool | None = None,
             which: str | int = 'best', dtype: str | None = None,
             allow_pickle: bool = False, progress: bool = True,
             return_logits: bool = False, worker_count: int = 0,
             num_threads: int = 8, image_key: str | None = None,
             label_key: str | None = None, mesh: Mesh | None = None) -> dict:
  """Evaluates a checkpoint on a tfds split; the ``results.json`` dict.

  Args:
    checkpoint: a path (see :func:`load_checkpoint`) or a loaded checkpoint.
    model, ema, which, allow_pickle: see :func:`load_checkpoint`.
    dataset: tfds name; default: a workdir's dataset, else
      ``'imagenet2012'``.
    split: default: a workdir's evaluation split, else ``'validation'`` or,
      for datasets without one, ``'test'``.
    data_dir: tfds data directory; default: a workdir's, else tfds's.
    preprocess, image_size, crop_fraction: see :func:`resolve_preprocessing`.
    batch_size: global batch (rounded up to a multiple of the devices);
      default: a workdir's eval batch size, else 256.
    dtype: computation dtype (``'float32'``, ``'bfloat16'``); default: a
      workdir's, else float32.
    progress: tqdm progress bar.
    return_logits: also return the logits and labels (numpy; not JSON).
    worker_count: grain worker processes.
    num_threads: decoding threads per process.
    image_key, label_key: the dataset's image and ClassLabel features
      (default ``'image'`` / ``'label'``, else its supervised keys).
    mesh: default: every device.

  Returns:
    ``top1`` and ``top5`` in percent, ``num_examples``, the hit counts,
    ``images_per_second``, and ``model``, ``checkpoint``, ``checkpoint_kind``,
    ``dataset``, ``split``, ``preprocessing``, ``ema``, ``num_classes``.
  """
  loaded = _as_loaded(checkpoint, model=model, ema=ema, which=which,
                      allow_pickle=allow_pickle)
  name, config = resolve_preprocessing(loaded, preprocess, image_size,
                                       crop_fraction)
  dataset = dataset or loaded.dataset or 'imagenet2012'
  if data_dir is None and dataset == loaded.dataset:
    data_dir = loaded.data_dir
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  if split is None:
    if loaded.split and dataset == loaded.dataset:
      split = loaded.split
    else:
      from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      split = input_pipeline.get_dataset_info(dataset, data_dir).eval_split
  net = loaded.create_model(dtype=_dtype(dtype))
  metrics = evaluate_model(
      net, loaded.variables, dataset=dataset, split=split, data_dir=data_dir,
      eval_config=config, num_classes=loaded.num_classes,
      batch_size=batch_size or loaded.batch_size or DEFAULT_BATCH_SIZE,
      mesh=mesh, progress=progress,
      return_logits=return_logits, worker_count=worker_count,
      num_threads=num_threads, image_key=image_key, label_key=label_key)
  results = {
      'top1': metrics.pop('top1'),
      'top5': metrics.pop('top5'),
      'num_examples': metrics.pop('num_examples'),
      'metrics_unit': 'percent',
      'model': loaded.model,
      'num_classes': loaded.num_classes,
      'checkpoint': os.path.abspath(loaded.path),
      'checkpoint_kind': loaded.kind,
      'dataset': dataset,
      'split': split,
      'data_dir': data_dir,
      'preprocessing': preprocessing_record(name, config),
      'ema': loaded.ema,
      'dtype': str(jnp.dtype(net.dtype)) if hasattr(net, 'dtype') else None,
  }
  if loaded.step is not None:
    results['step'] = loaded.step
  if loaded.run_metrics:
    results['checkpoint_metrics'] = dict(loaded.run_metrics)
  results.update(metrics)
  return results


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def _composite_on_white(image) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgba = image.convert('RGBA')
  white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
  return np.asarray(Image.alpha_composite(white, rgba).convert('RGB'))


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[:, :, None], 3, axis=2)


def pil_to_rgb(image) -> np.ndarray:
  """A PIL image as ``(H, W, 3)`` uint8 RGB.

  * 16-bit grey (``I;16*``) is scaled to 8 bits (``v / 257``, rounded);
    PIL's own conversion would clip everything above 255 to white. 32-bit
    integer grey (``I``) is read as 8-bit if no value exceeds 255, else as
    16-bit (clipped to [0, 65535]).
  * Float grey (``F``) is read as [0, 1] if it lies there, else as [0, 255]
    (clipped).
  * Transparency (RGBA, LA, palette with a transparent color) is composited
    over white, as an image viewer shows it; opaque pixels are unchanged.
  * Bilevel, grey, palette, CMYK, YCbCr and others: PIL's RGB conversion.
  """
  mode = image.mode
  if mode.startswith('I;16') or mode == 'I':
    a = np.asarray(image).astype(np.float64)
    if mode == 'I' and a.size and a.max() <= 255 and a.min() >= 0:
      grey = a
    else:
      grey = np.clip(a, 0, 65535) / 257.0
    return _grey_to_rgb(np.round(grey).astype(np.uint8))
  if mode == 'F':
    a = np.nan_to_num(np.asarray(image, np.float64))
    if a.size and a.min() >= 0.0 and a.max() <= 1.0:
      a = a * 255.0
    return _grey_to_rgb(np.round(np.clip(a, 0, 255)).astype(np.uint8))
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      mode == 'P' and 'transparency' in image.info):
    return _composite_on_white(image)
  if mode == 'RGB':
    return np.asarray(image)
  return np.asarray(image.convert('RGB'))


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as ``(H, W, 3)`` uint8 RGB (see :func:`pil_to_rgb`).

  EXIF orientation is applied (photos from phones come out upright);
  multi-frame files give their first frame.

  Raises:
    ImageError: naming the file: missing, not an image, truncated or
      corrupt, too large, or of an unsupported mode.
  """
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ImageError(path, 'file not found.')
  if os.path.isdir(path):
    raise ImageError(path, 'is a directory, not an image file.')
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image) or image
      rgb = pil_to_rgb(image)
  except Image.DecompressionBombError as e:
    raise ImageError(path, f'refused as too large ({e}).') from None
  except (OSError, ValueError, SyntaxError, EOFError, IndexError,
          TypeError) as e:
    what = str(e) or type(e).__name__
    raise ImageError(path, f'cannot read this image ({what}); the file is '
                     'not an image PIL can decode, or it is truncated or '
                     'corrupt.') from None
  if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
    raise ImageError(path, f'decodes to an unusable array of shape '
                     f'{rgb.shape}.')
  return np.ascontiguousarray(rgb)


def preprocess_image(image: np.ndarray,
                     eval_config: registry.EvalConfig) -> np.ndarray:
  """``(H, W, 3)`` uint8 -> the model's ``(S, S, 3)`` float32 input."""
  from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.preprocess_eval(
      image, eval_config.input_size, eval_config.crop_fraction,
      eval_config.interpolation, eval_config.mean, eval_config.std)


@functools.lru_cache(maxsize=16)
def _make_predict(model, mesh: Mesh, k: int):
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

  def predict(variables, images):
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k)
    return logits, top_p, top_i

  return jax.jit(predict, in_shardings=(replicated, batch),
                 out_shardings=(batch, batch, batch))


def predict_arrays(model, variables: Mapping, images: np.ndarray, *,
                   top_k: int = DEFAULT_TOP_K, batch_size: int = 64,
                   mesh: Mesh | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Logits and top-k of preprocessed ``(N, S, S, 3)`` images.

  Returns ``(logits (N, C), top-k probabilities (N, k), top-k indices
  (N, k))``; ``k = min(top_k, C)``. Every batch is padded to ``batch_size``
  rounded up to a multiple of the device count (one compiled shape) and
  sharded over ``mesh`` (default: this process's devices).
  """
  mesh = make_mesh(jax.local_devices()) if mesh is None else mesh
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  num_classes = getattr(model, 'num_classes', None)
  if not num_classes:
    num_classes = int(jax.eval_shape(
        lambda x: model.apply(variables, x, train=False),
        jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32)).shape[-1])
  k = max(1, min(int(top_k), num_classes))
  predict = _make_predict(model, mesh, k)
  variables = _replicate(dict(variables), mesh)
  chunk = round_batch_size(batch_size, mesh)
  outs = []
  for start in range(0, n, chunk):
    part = images[start:start + chunk]
    pad = chunk - part.shape[0]
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:],
                                            np.float32)])
    sharded = jax.device_put(part, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
    outs.append([np.asarray(o)[:chunk - pad] for o in predict(variables,
                                                               sharded)])
  if not outs:
    return (np.zeros((0, num_classes), np.float32), np.zeros((0, k)),
            np.zeros((0, k), np.int32))
  return tuple(np.concatenate([o[i] for o in outs]) for i in range(3))


def class_names_for(loaded: LoadedCheckpoint, dataset: str | None = None,
                    data_dir: str | None = None) -> tuple[str, ...] | None:
  """Names of ``loaded``'s classes: its own, a dataset's, or ImageNet's."""
  if dataset:
    from ghostnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    info = input_pipeline.get_dataset_info(dataset, data_dir)
    if info.num_classes != loaded.num_classes:
      raise EvalError(f'Dataset {dataset!r} has {info.num_classes} classes '
                      f'but the model has {loaded.num_classes} outputs.')
    if info.class_names:
      return tuple(info.class_names)
  if loaded.class_names and len(loaded.class_names) == loaded.num_classes:
    return tuple(loaded.class_names)
  if loaded.num_classes == NUM_IMAGENET_CLASSES:
    return imagenet_classes()
  return None


def classify_images(checkpoint: str | os.PathLike | LoadedCheckpoint,
                    paths: Iterable[str | os.PathLike], *,
                    model: str | None = None, preprocess: str | None = None,
                    image_size: int | None = None,
                    crop_fraction: float | None = None,
                    ema: bool | None = None, which: str | int = 'best',
                    top_k: int = DEFAULT_TOP_K, batch_size: int = 64,
                    dataset: str | None = None, data_dir: str | None = None,
                    dtype: str | None = None, allow_pickle: bool = False,
                    return_inputs: bool = False) -> dict:
  """Top-k classes of each image file.

  Unreadable files do not stop the others: they are listed under
  ``'errors'`` (each an :class:`ImageError` naming the file).

  Returns:
    ``{'model', 'checkpoint', 'preprocessing', 'ema', 'predictions': [{'file',
    'top_k': [{'index', 'class', 'probability'}, ...]}, ...],
    'errors': [ImageError, ...]}``; with ``return_inputs`` also ``'inputs'``
    (the preprocessed ``(N, S, S, 3)`` float32 images, readable files only)
    and ``'logits'``.
  """
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise EvalError('No image files given.')
  loaded = _as_loaded(checkpoint, model=model, ema=ema, which=which,
                      allow_pickle=allow_pickle)
  name, config = resolve_preprocessing(loaded, preprocess, image_size,
                                       crop_fraction)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise EvalError(f'top_k must be a positive int, got {top_k!r}.')
  names = class_names_for(loaded, dataset, data_dir)
  net = loaded.create_model(dtype=_dtype(dtype))
  mesh = make_mesh(jax.local_devices())
  # Files are read one batch at a time; a job smaller than batch_size runs
  # as one batch of its own size.
  chunk = round_batch_size(min(batch_size, len(paths)), mesh)
  errors, predictions, kept_inputs, kept_logits = [], [], [], []
  for start in range(0, len(paths), chunk):
    ok_paths, inputs = [], []
    for path in paths[start:start + chunk]:
      try:
        inputs.append(preprocess_image(load_image(path), config))
        ok_paths.append(path)
      except ImageError as e:
        errors.append(e)
    if not inputs:
      continue
    x = np.stack(inputs)
    logits, top_p, top_i = predict_arrays(net, loaded.variables, x,
                                          top_k=top_k, batch_size=chunk,
                                          mesh=mesh)
    for path, ps, ids in zip(ok_paths, top_p, top_i):
      predictions.append({'file': path, 'top_k': [
          {'index': int(i), 'class': names[int(i)] if names else None,
           'probability': float(p)} for p, i in zip(ps, ids)]})
    if return_inputs:
      kept_inputs.append(x)
      kept_logits.append(logits)
  out = {'model': loaded.model, 'checkpoint': os.path.abspath(loaded.path),
         'checkpoint_kind': loaded.kind,
         'preprocessing': preprocessing_record(name, config),
         'ema': loaded.ema, 'predictions': predictions, 'errors': errors}
  if return_inputs:
    out['inputs'] = np.concatenate(kept_inputs) if kept_inputs else None
    out['logits'] = np.concatenate(kept_logits) if kept_logits else None
  return out


def format_predictions(result: Mapping) -> str:
  """Human-readable lines for :func:`classify_images`'s result."""
  lines = []
  for pred in result['predictions']:
    lines.append(f'{pred["file"]}:')
    for rank, item in enumerate(pred['top_k'], 1):
      label = item['class'] if item['class'] is not None \
          else f'class {item["index"]}'
      if item['class'] is not None:
        label = f'{label} ({item["index"]})'
      lines.append(f'  {rank}. {100.0 * item["probability"]:6.2f}%  {label}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _which(value: str) -> str | int:
  if value in ('best', 'latest'):
    return value
  try:
    step = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected 'best', 'latest' or a step number, got {value!r}") from None
  if step < 0:
    raise argparse.ArgumentTypeError(f'step must be >= 0, got {step}')
  return step


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``eval.py``."""
  p = argparse.ArgumentParser(
      prog='eval.py',
      description='Evaluate a GhostNet checkpoint (PyTorch file, converted '
      'orbax directory or train.py workdir) on a tfds dataset, or classify '
      'image files with it. Top-1/top-5 are in percent.')
  p.add_argument('--checkpoint', required=True,
                 help='a .pth/.pth.tar file, a converted orbax directory, or '
                 'a train.py workdir')
  p.add_argument('--model', default=None,
                 help='registered model name (default: from the checkpoint; '
                 'for a PyTorch file, the one model it fits)')
  p.add_argument('--images', nargs='+', default=None, metavar='FILE',
                 help='classify these image files and print the top classes '
                 'instead of evaluating a dataset')
  p.add_argument('--dataset', default=None,
                 help="tfds name (default: a workdir's dataset, else "
                 'imagenet2012); with --images, its class names are used')
  p.add_argument('--split', default=None,
                 help="tfds split (default: a workdir's eval split, else "
                 'validation, or test if there is none)')
  p.add_argument('--data_dir', '--data-dir', default=None,
                 help="tfds data directory (default: a workdir's, else "
                 "tfds's default)")
  p.add_argument('--preprocess', default=None,
                 choices=sorted(registry.PREPROCESS_PRESETS),
                 help="preset (default: a workdir's own preprocessing, else "
                 "the model's default): official = resize 256 bilinear + "
                 'center crop 224; timm = the same with bicubic')
  p.add_argument('--image_key', '--image-key', default=None,
                 help="the dataset's image feature (default: image)")
  p.add_argument('--label_key', '--label-key', default=None,
                 help="the dataset's ClassLabel feature (default: label)")
  p.add_argument('--image_size', '--image-size', type=int, default=None,
                 help='override the input size')
  p.add_argument('--crop_fraction', '--crop-fraction', type=float,
                 default=None, help='override the center-crop fraction')
  p.add_argument('--batch_size', '--batch-size', type=int, default=None,
                 help="global batch, rounded up to a multiple of the devices "
                 f"(default: a workdir's eval batch, else {DEFAULT_BATCH_SIZE}"
                 '; 64 for --images)')
  group = p.add_mutually_exclusive_group()
  group.add_argument('--ema', dest='ema', action='store_true', default=None,
                     help='require and use EMA weights')
  group.add_argument('--no-ema', '--no_ema', dest='ema', action='store_false',
                     help='use the regular weights even if EMA ones exist '
                     '(default: EMA when the checkpoint has them)')
  p.add_argument('--which', type=_which, default='best',
                 help="workdir checkpoint: 'best' (by eval top-1), 'latest' or "
                 'a step')
  p.add_argument('--dtype', default=None, choices=sorted(DTYPES),
                 help="computation dtype (default: a workdir's, else float32)")
  p.add_argument('--top_k', '--top-k', type=int, default=DEFAULT_TOP_K,
                 help='classes printed per image')
  p.add_argument('--output', default=None,
                 help='write the results as JSON to this file')
  p.add_argument('--worker_count', '--worker-count', type=int, default=0,
                 help='grain worker processes for decoding (per host)')
  p.add_argument('--num_threads', '--num-threads', type=int, default=8,
                 help='decoding threads (per host)')
  p.add_argument('--allow_pickle', '--allow-pickle', action='store_true',
                 help='let torch.load unpickle arbitrary objects (trusted '
                 'files only)')
  p.add_argument('--no_progress', '--no-progress', action='store_true',
                 help='no progress bar')
  p.add_argument('--distributed', action='store_true',
                 help='call jax.distributed.initialize() first (multi-host)')
  return p


def _jsonable(obj):
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, ImageError):
    return {'file': obj.path, 'error': obj.problem}
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  return obj


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON (atomically: temp file + rename)."""
  path = os.path.expanduser(path)
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise EvalError(f'Cannot write {path}: directory {parent} does not '
                    'exist.')
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(_jsonable(obj), f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


def _print_summary(results: Mapping) -> None:
  ips = results.get('images_per_second')
  print(f'{results["model"]} on {results["dataset"]}:{results["split"]} '
        f'({results["num_examples"]} examples, preprocessing '
        f'{results["preprocessing"]["name"]}, ema {results["ema"]}): '
        f'top-1 {results["top1"]:.3f}%  top-5 {results["top5"]:.3f}%'
        + (f'  ({ips:.1f} img/s)' if ips else ''))


def main(argv: Sequence[str] | None = None) -> int:
  """``eval.py``: returns the exit status (2 for a user mistake)."""
  args = build_parser().parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  is_main = jax.process_index() == 0
  try:
    if args.output:
      parent = os.path.dirname(os.path.abspath(os.path.expanduser(args.output)))
      if not os.path.isdir(parent):
        raise EvalError(f'--output {args.output}: directory {parent} does not '
                        'exist.')
    if args.images:
      if args.split is not None:
        raise EvalError('--split does not apply to --images.')
      result = classify_images(
          args.checkpoint, args.images, model=args.model,
          preprocess=args.preprocess, image_size=args.image_size,
          crop_fraction=args.crop_fraction, ema=args.ema, which=args.which,
          top_k=args.top_k, batch_size=args.batch_size or 64,
          dataset=args.dataset,
          data_dir=args.data_dir, dtype=args.dtype,
          allow_pickle=args.allow_pickle)
      if is_main:
        if result['predictions']:
          print(format_predictions(result))
        for error in result['errors']:
          print(f'error: {error}', file=sys.stderr)
        if args.output:
          write_json(args.output, result)
      if result['errors']:
        return 2
      return 0
    results = evaluate(
        args.checkpoint, model=args.model, dataset=args.dataset,
        split=args.split, data_dir=args.data_dir, preprocess=args.preprocess,
        image_size=args.image_size, crop_fraction=args.crop_fraction,
        batch_size=args.batch_size, ema=args.ema, which=args.which,
        dtype=args.dtype, allow_pickle=args.allow_pickle,
        progress=not args.no_progress, worker_count=args.worker_count,
        num_threads=args.num_threads, image_key=args.image_key,
        label_key=args.label_key)
    if is_main:
      _print_summary(results)
      if args.output:
        write_json(args.output, results)
    return 0
  except (ValueError, OSError) as e:
    # The library's errors (CheckpointError, EvalError, ImageError) are
    # ValueErrors; a missing file is an OSError.
    print(f'error: {e}', file=sys.stderr)
    return 2
