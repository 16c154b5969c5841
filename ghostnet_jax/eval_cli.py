"""The command line of ``eval.py``: :func:`main`.

Evaluates a checkpoint on a tfds split (:func:`ghostnet_jax.eval_lib.evaluate`)
or classifies image files (:func:`ghostnet_jax.classify.classify_images`);
prints a summary and writes JSON with ``--output``. User mistakes print
``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from ghostnet_jax import registry, utils
from ghostnet_jax.classify import (DEFAULT_TOP_K, ImageError, classify_images,
                                   format_predictions)
from ghostnet_jax.eval_lib import (DEFAULT_BATCH_SIZE, DTYPES, EvalError,
                                   evaluate)


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
  """Writes ``obj`` (numpy values and image errors made JSON) as indented
  JSON, atomically (:func:`ghostnet_jax.utils.write_json`)."""
  path = os.path.expanduser(path)
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise EvalError(f'Cannot write {path}: directory {parent} does not '
                    'exist.')
  utils.write_json(path, _jsonable(obj))


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


if __name__ == '__main__':
  sys.exit(main())


def run() -> None:
  """Script and console-script entry point: Ctrl-C exits 130 without a
  traceback (:func:`ghostnet_jax.interrupts.exit_on_interrupt`)."""
  from ghostnet_jax import interrupts, runtime  # pylint: disable=g-import-not-at-top
  interrupts.exit_on_interrupt('eval.py')
  runtime.enable_compilation_cache()  # GHOSTNET_JAX_CACHE_DIR=off: no cache
  sys.exit(main())
