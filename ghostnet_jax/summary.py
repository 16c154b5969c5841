"""Print a per-stage table of output shape, parameters and MACs.

    python -m ghostnet_jax.summary ghostnet_100 [--image-size 224]
    python -m ghostnet_jax.summary all          # one line per model
    python -m ghostnet_jax.summary all --markdown   # the README's model table
    python -m ghostnet_jax.summary all --sources    # every pretrained source

A single model's table is followed by its pretrained weight sources
(``load_pretrained(name, source=TAG)``).
"""

from __future__ import annotations

import argparse
import sys

from ghostnet_jax import registry, sources
from ghostnet_jax.macs import format_summary, summarize


def _size(name: str, image_size: int, **kwargs) -> tuple[int, int]:
  rows = summarize(name, image_size, **kwargs)
  return sum(r['params'] for r in rows), sum(r['macs'] for r in rows)


_SOURCE_LABELS = {'timm': 'timm Hub', 'paddle': 'PaddleClas',
                  'paddle_ssld': 'PaddleClas SSLD', 'mindcv': 'mindcv',
                  'mindspore_zoo': 'MindSpore zoo', 'tf': 'TF checkpoint'}


def weights_cell(name: str) -> str:
  """The README's weights cell: every loadable source, the default in bold.

  Official PyTorch files show their file name."""
  default = sources.default_source(name)
  parts = []
  for s in sources.list_sources(name):
    if not s.loadable:
      continue
    if s.tag.startswith('official'):
      label = f'`{s.file_name}`' + (' EMA' if s.ema else '')
      if s.ema is False:
        label = f'`{s.file_name}` non-EMA'
    else:
      label = _SOURCE_LABELS.get(s.tag, s.tag)
    parts.append(f'**{label}**' if s is default else label)
  return ' · '.join(parts) if parts else '-'


def sources_table() -> str:
  """Every registered source: model, tag, format, top-1, URL, verification."""
  lines = []
  for s in sources.list_sources():
    top1 = f'{s.top1:.2f}' if s.top1 is not None else '-'
    state = '' if s.loadable else ' [not loadable]'
    lines.append(f'{s.model:<20} {s.tag:<14} {s.format:<11} {top1:>6}  '
                 f'{s.url}{state}')
  return '\n'.join(lines)


def markdown_table(image_size: int = 224) -> str:
  """One row per registered model: family, params, MACs, paper top-1,
  pretrained weights (default in bold). Re-parameterisable models show
  training / deploy."""
  lines = ['| model | family | params | MACs | paper top-1 | pretrained weights |',
           '|---|---|---:|---:|---:|---|']
  order = ('ghostnet', 'ghostnetv2', 'ghostnetv3', 'g_ghost', 'ghost_resnet')
  names = sorted(registry.list_models(), key=lambda n: (
      order.index(f) if (f := registry.get_entry(n).family) in order
      else len(order), n))
  for name in names:
    entry = registry.get_entry(name)
    params, macs = _size(name, image_size)
    p_txt, m_txt = f'{params:,}', f'{macs / 1e6:.1f}M'
    try:
      d_params, d_macs = _size(name, image_size, deploy=True)
      p_txt = f'{p_txt} / {d_params:,}'
      m_txt = f'{m_txt} / {d_macs / 1e6:.1f}M'
    except TypeError:
      pass  # No deploy form.
    top1 = f'{entry.paper_top1:.1f}' if entry.paper_top1 else '-'
    weights = weights_cell(name)
    lines.append(f'| `{name}` | {entry.family} | {p_txt} | {m_txt} | {top1} '
                 f'| {weights} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ghostnet_jax.summary',
      description='Per-stage output shape, parameters and MACs of a model.')
  parser.add_argument('model', help='registered model name, e.g. ghostnet_100'
                      ' (`all` for one line per model)')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--num-classes', type=int, default=1000)
  parser.add_argument('--markdown', action='store_true',
                      help='with `all`: a Markdown table with paper top-1 '
                      'and pretrained weights')
  parser.add_argument('--sources', action='store_true',
                      help='with `all`: every registered pretrained source')
  args = parser.parse_args(argv)
  try:
    if args.model == 'all' and args.sources:
      print(sources_table())
      return 0
    if args.model == 'all' and args.markdown:
      print(markdown_table(args.image_size))
      return 0
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
  from ghostnet_jax.pretrained import describe_sources  # pylint: disable=g-import-not-at-top
  print()
  print(describe_sources(args.model))
  return 0


if __name__ == '__main__':
  sys.exit(main())
