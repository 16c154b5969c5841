"""ImageNet-1k class names, shipped as package data.

``data/imagenet_classes.tsv`` has 1000 lines ``synset<TAB>names`` in the
label order of tfds's ``imagenet2012`` (and of the official and timm
checkpoints): the class of logit ``i`` is line ``i``.
"""

from __future__ import annotations

import functools
from importlib import resources

NUM_IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=None)
def _read_table() -> tuple[tuple[str, str], ...]:
  text = resources.files('ghostnet_jax').joinpath(
      'data', 'imagenet_classes.tsv').read_text(encoding='utf-8')
  rows = []
  for number, line in enumerate(text.splitlines(), 1):
    synset, sep, names = line.partition('\t')
    if not sep or not synset or not names:
      raise RuntimeError(f'imagenet_classes.tsv line {number} is not '
                         f'"synset<TAB>names": {line!r}')
    rows.append((synset, names))
  if len(rows) != NUM_IMAGENET_CLASSES:
    raise RuntimeError(f'imagenet_classes.tsv has {len(rows)} lines, '
                       f'expected {NUM_IMAGENET_CLASSES}.')
  return tuple(rows)


def imagenet_classes() -> tuple[str, ...]:
  """The 1000 ImageNet class names (WordNet lemmas, e.g. ``'tabby, tabby cat'``),
  indexed by label."""
  return tuple(names for _, names in _read_table())


def imagenet_synsets() -> tuple[str, ...]:
  """The 1000 WordNet ids (``'n01440764'``, ...), indexed by label."""
  return tuple(synset for synset, _ in _read_table())
