"""Print a per-stage table of output shape, parameters and MACs.

    python -m ghostnet_jax.summary ghostnet_100 [--image-size 224]
    python -m ghostnet_jax.summary all          # one line per model
"""

from __future__ import annotations

import argparse
import sys

from ghostnet_jax import registry
from ghostnet_jax.macs import format_summary, summarize


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ghostnet_jax.summary',
      description='Per-stage output shape, parameters and MACs of a model.')
  parser.add_argument('model', help='registered model name, e.g. ghostnet_100'
                      ' (`all` for one line per model)')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--num-classes', type=int, default=1000)
  args = parser.parse_args(argv)
  try:
    if args.model == 'all':
      for name in registry.list_models():
        rows = summarize(name, args.image_size, num_classes=args.num_classes)
        print(f'{name:<24} {sum(r["params"] for r in rows):>12,} params '
              f'{sum(r["macs"] for r in rows) / 1e6:>10.1f}M MACs')
      return 0
    rows = summarize(args.model, args.image_size, num_classes=args.num_classes)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_summary(args.model, rows, args.image_size))
  return 0


if __name__ == '__main__':
  sys.exit(main())
