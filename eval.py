#!/usr/bin/env python
"""Evaluate GhostNet checkpoints on tfds datasets, or classify photos.

  # The official PyTorch weights on ImageNet (converted on the fly):
  python eval.py --checkpoint state_dict_73.98.pth --model ghostnet_100 \\
      --dataset imagenet2012 --data_dir ~/tensorflow_datasets --output results.json
  # A converted orbax directory, or a train.py workdir (all settings from it):
  python eval.py --checkpoint converted/ghostnet_100
  python eval.py --checkpoint workdirs/default
  # Top-5 classes of image files:
  python eval.py --checkpoint state_dict_73.98.pth --images cat.jpg dog.png

Top-1/top-5 are in percent. Mistakes (missing or mismatched checkpoint,
unknown model or dataset, unreadable image) print ``error: ...`` and exit
with status 2. See ``ghostnet_jax/eval_lib.py`` for the library, ``ghostnet_jax/eval_cli.py``
for this command line.
"""

from ghostnet_jax import eval_cli

if __name__ == '__main__':
  eval_cli.run()
