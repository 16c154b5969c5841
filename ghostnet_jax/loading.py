"""One checkpoint loader: any checkpoint -> model name, variables, metadata.

:func:`load_checkpoint` reads the three kinds of checkpoint this package
knows and returns a :class:`LoadedCheckpoint` (model name, variables, number
of classes, class names, EMA or not, and what the checkpoint recorded):

* a PyTorch file (``.pth`` / ``.pth.tar``, official or timm layout),
  converted on the fly by :mod:`ghostnet_jax.convert`; the model is
  ``model=`` or, when omitted, the one registered architecture whose keys and
  shapes the file matches exactly (:func:`infer_torch_model`); the number of
  classes is read off the classifier;
* a converted orbax directory (``python -m ghostnet_jax.convert``): model and
  classes from its metadata;
* a ``train.py`` workdir: the best (or latest) checkpoint, with model,
  dataset, split, classes and preprocessing taken from the run's config and
  metadata (the model built by :func:`model_from_config`, as the trainer
  built it).

``eval.py``, the trainer's ``config.init_from`` and every other reader of
weights go through here. It sits in the checkpoint layer: it imports the
converter, the orbax helpers and the registry, never the trainer or the
evaluator.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from ghostnet_jax import checkpoint as ckpt_lib
from ghostnet_jax import convert, registry, utils
from ghostnet_jax.class_names import NUM_IMAGENET_CLASSES, imagenet_classes


class LoadError(ValueError):
  """A checkpoint that cannot be loaded as asked (a user mistake).

  ``eval_lib.EvalError`` is this class.
  """


# ---------------------------------------------------------------------------
# A model from a config (the trainer's, or a workdir's config.json)
# ---------------------------------------------------------------------------

def model_kwargs(config: Mapping) -> dict:
  """The :func:`ghostnet_jax.create_model` arguments a training config sets.

  ``dtype`` (by name, :data:`ghostnet_jax.utils.DTYPES`), ``dropout``,
  ``bn_batch_groups`` (-1, one group per device, is 1 here: the trainer
  overrides it with the device count), ``conv_impl`` and the fields of
  ``model_overrides`` (lists made tuples). Fields a config lacks are left to
  the model's defaults.
  """
  kwargs = {}
  if config.get('dtype'):
    kwargs['dtype'] = utils.dtype_of(config.get('dtype'))
  if config.get('dropout') is not None:
    kwargs['dropout'] = config.get('dropout')
  groups = config.get('bn_batch_groups')
  if groups is not None:
    kwargs['bn_batch_groups'] = 1 if groups == -1 else groups
  if config.get('conv_impl'):
    kwargs['conv_impl'] = config.get('conv_impl')
  kwargs.update(utils.freeze(config.get('model_overrides') or {}))
  return kwargs


def model_from_config(config: Mapping, num_classes: int, **overrides):
  """The model a config trains (also for a config read from ``config.json``).

  Args:
    config: a training config (or ``restore_workdir(...)['config']``).
    num_classes: classifier outputs (``meta['num_classes']`` of a workdir).
    **overrides: model fields replacing the config's, e.g.
      ``bn_batch_groups=1`` or ``conv_impl='lax'``.
  """
  kwargs = {**model_kwargs(config), **overrides}
  return registry.create_model(config['model'], num_classes=num_classes,
                               **kwargs)


def workdir_dataset(config: Mapping, meta: Mapping) -> str | None:
  """The tfds name a run read: ``meta['dataset_name']`` as the trainer
  recorded it; for runs that predate it, derived from the config by the
  trainer's own rule (``'digits'`` -> ``ghostnet_digits/32`` or ``/64``)."""
  if meta.get('dataset_name'):
    return meta['dataset_name']
  dataset = meta.get('dataset') or config.get('dataset')
  if dataset in DIGITS_ALIASES:
    from ghostnet_jax import datasets  # pylint: disable=g-import-not-at-top
    size = datasets.config_size_for(int(config.get('image_size') or 32))
    dataset = f'{datasets.DIGITS_NAME}/{size}'
  return dataset


# The names config.dataset accepts for the bundled digits.
DIGITS_ALIASES = ('digits', 'ghostnet_digits')


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
    LoadError: when no model or several models match (then ``--model`` has
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
    raise LoadError(f'{source} fits several models ({", ".join(matches)}); '
                    'pass --model to say which.')
  hint = (f' It is close to {", ".join(close)} but does not match it exactly.'
          if close else '')
  raise LoadError(f'Cannot tell which model {source} holds: its keys and '
                  f'shapes match no registered model.{hint} Pass --model '
                  f'NAME (one of {", ".join(registry.list_models())}); the '
                  'error then lists every mismatch.')


def _top_level_has_ema(obj: Any) -> bool:
  return isinstance(obj, Mapping) and any(
      isinstance(obj.get(k), Mapping) for k in convert.EMA_KEYS)


def _load_torch(path: str, model: str | None, ema: bool | None,
                allow_pickle: bool, kwargs: Mapping) -> LoadedCheckpoint:
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
        state_dict, model, source=path, num_classes=num_classes, **kwargs)
  except convert.CheckpointError as e:
    try:
      fits = infer_torch_model(state_dict, path)
    except LoadError:
      raise e from None
    raise convert.CheckpointError(
        f'{e}\n{path} is a {fits} checkpoint: pass --model {fits} (or leave '
        '--model out).') from None
  return LoadedCheckpoint(
      kind='torch', path=path, model=model, num_classes=num_classes,
      variables=variables, ema=_top_level_has_ema(obj) and ema is not False,
      class_names=(imagenet_classes() if num_classes == NUM_IMAGENET_CLASSES
                   else None))


def _load_converted(path: str, model: str | None, ema: bool | None,
                    kwargs: Mapping) -> LoadedCheckpoint:
  variables, metadata = ckpt_lib.restore_converted(path)
  saved_model = metadata.get('model')
  num_classes = int(metadata.get('num_classes', NUM_IMAGENET_CLASSES))
  if model is None:
    if not saved_model:
      raise LoadError(f'{path} does not record its model; pass --model.')
    registry.get_entry(saved_model)
    model = saved_model
  saved_ema = metadata.get('ema')
  if ema is not None and saved_ema is not None and bool(saved_ema) != ema:
    raise LoadError(
        f'{path} holds the {"EMA" if saved_ema else "regular"} weights only '
        f'(chosen at conversion), but {"--ema" if ema else "--no-ema"} asked '
        'for the others; convert the PyTorch file again with the other '
        'choice.')
  if ema is not None and saved_ema is None:
    raise LoadError(
        f'{path} holds one set of weights, and its conversion did not record '
        'whether they are EMA weights; --ema/--no-ema choose among the '
        'weights of a PyTorch file or a train.py workdir. Drop the option, or '
        'convert again with --ema or --no-ema.')
  convert.check_variables(variables, model, num_classes, source=path,
                          **kwargs)
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

def _load_workdir(path: str, model: str | None, ema: bool | None,
                  which: str | int) -> LoadedCheckpoint:
  """A train.py workdir: variables, and the run's model, data and
  preprocessing from its config."""
  restored = ckpt_lib.restore_workdir(path, which=which)
  config, meta = restored['config'], dict(restored.get('meta') or {})
  run_model = meta.get('model') or config.get('model')
  if model is not None and model != run_model:
    raise LoadError(f'{path} is a {run_model} run, but --model {model} was '
                    'given; leave --model out for a workdir.')
  model = run_model
  registry.get_entry(model)
  ema_variables = restored.get('ema_variables')
  if ema is True and ema_variables is None:
    raise LoadError(f'EMA weights requested, but the run in {path} kept no '
                    'EMA (config.ema_decay was 0).')
  use_ema = ema_variables is not None and ema is not False
  variables = ema_variables if use_ema else restored['variables']
  num_classes = int(meta.get('num_classes') or config.get('num_classes'))
  kwargs = model_kwargs(config)
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
      dataset=workdir_dataset(config, meta),
      split=config.get('eval_split') or None,
      data_dir=os.fspath(data_dir) if data_dir else None,
      eval_config=eval_config, step=restored.get('step'),
      run_metrics=restored.get('metrics'), metadata=meta,
      batch_size=config.get('eval_batch_size') or None)


def load_checkpoint(path: str | os.PathLike, *, model: str | None = None,
                    ema: bool | None = None, which: str | int = 'best',
                    allow_pickle: bool = False,
                    model_kwargs: Mapping | None = None) -> LoadedCheckpoint:
  """Reads any checkpoint: a PyTorch file, a converted directory or a workdir.

  Args:
    path: a PyTorch file, a converted orbax directory or a train.py workdir.
    model: registered model name; required for a PyTorch file that fits
      several models, checked against the others.
    ema: ``None`` uses EMA weights when the checkpoint has them, ``True``
      requires them, ``False`` uses the regular weights.
    which: for a workdir, ``'best'``, ``'latest'`` or a step.
    allow_pickle: let ``torch.load`` unpickle arbitrary objects.
    model_kwargs: architecture arguments of :func:`ghostnet_jax.create_model`
      the weights of a PyTorch file or a converted directory were made with
      (e.g. a trainer's ``model_overrides``); a workdir records its own.

  Raises:
    FileNotFoundError: nothing at ``path``.
    convert.CheckpointError: the weights do not fit the model (the message
      lists every missing, unexpected and mis-shaped key), or a bad file.
    LoadError, ValueError: other user mistakes (unknown model, ...).
  """
  if model is not None:
    registry.get_entry(model)  # Unknown names fail before any file I/O.
  kwargs = dict(model_kwargs or {})
  path = os.fspath(os.path.expanduser(os.fspath(path)))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Checkpoint not found: {path} (expected a PyTorch .pth file, a '
        'converted orbax directory or a train.py workdir).')
  if os.path.isdir(path):
    if ckpt_lib.is_workdir(path):
      return _load_workdir(path, model, ema, which)
    if ckpt_lib.is_converted_checkpoint(path):
      return _load_converted(path, model, ema, kwargs)
    raise LoadError(
        f'{path} is a directory but neither a converted checkpoint (no '
        f'0/{ckpt_lib.VARIABLES}/ inside) nor a train.py workdir (no '
        'config.json and checkpoints/).')
  return _load_torch(path, model, ema, allow_pickle, kwargs)



def as_loaded(checkpoint, **load_kwargs) -> LoadedCheckpoint:
  """``checkpoint`` itself if already loaded, else :func:`load_checkpoint`."""
  if isinstance(checkpoint, LoadedCheckpoint):
    return checkpoint
  return load_checkpoint(checkpoint, **load_kwargs)
