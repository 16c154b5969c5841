"""Image-folder datasets (``dataset='folder:/path'``) from the sklearn digits.

The test writes ``train/<digit>/*.png|jpg`` and ``val/<digit>/*`` plus a
few bad files (a truncated JPEG header, a text file), then checks the
listing, the bad-file policies, the errors, the process sharding, and
(slow) that the trainer trains and evaluates on it with the recipe
augmentations on and stores the class list in the workdir.
"""

import os

import numpy as np
import pytest
from PIL import Image

import train_test_utils
from ghostnet_jax import input_pipeline as ip
from ghostnet_jax import train_lib
from ghostnet_jax.datasets import folder


def _write_digits(root, per_class_train=30, per_class_val=8):
  from sklearn.datasets import load_digits
  d = load_digits()
  counts = {}
  for img, label in zip(d.images, d.target):
    n = counts.get(label, 0)
    if n >= per_class_train + per_class_val:
      continue
    counts[label] = n + 1
    split = 'train' if n < per_class_train else 'val'
    directory = os.path.join(root, split, f'digit_{label}')
    os.makedirs(directory, exist_ok=True)
    grey = np.kron(img * (255 / 16), np.ones((4, 4))).astype(np.uint8)
    suffix = '.jpg' if n % 3 == 0 else '.png'  # mixed formats, grey images
    Image.fromarray(grey).save(os.path.join(directory, f'{n:03d}{suffix}'))


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder_digits'))
  _write_digits(root)
  bad = [os.path.join(root, 'train', 'digit_3', 'broken.jpg'),
         os.path.join(root, 'train', 'digit_5', 'notes.txt'),
         os.path.join(root, 'val', 'digit_1', 'empty.png')]
  with open(bad[0], 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 definitely not a jpeg')
  with open(bad[1], 'w') as f:
    f.write('not an image')
  open(bad[2], 'wb').close()
  return root, bad


def test_listing_skip_counts_and_names_bad_files(digits_folder, caplog):
  root, bad = digits_folder
  split = folder.open_split(root, 'train', 'skip')
  assert len(split) == 300 and sorted(split.skipped) == sorted(bad[:2])
  assert folder.class_names(root) == tuple(f'digit_{i}' for i in range(10))
  ex = split[0]
  assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
  assert ex['label'] == 0
  info = ip.get_dataset_info(f'folder:{root}', bad_files='skip')
  assert info.num_classes == 10 and info.splits == {'train': 300, 'val': 80}
  assert info.class_names[3] == 'digit_3'


def test_fail_mode_names_every_bad_path(digits_folder):
  root, bad = digits_folder
  with pytest.raises(folder.FolderError) as e:
    folder.open_split(root, 'train', 'fail')
  assert '2 bad file(s)' in str(e.value)
  for path in bad[:2]:
    assert path in str(e.value)


def test_trainer_refuses_bad_files_before_compute(digits_folder, tmp_path):
  root, bad = digits_folder
  config = train_test_utils.tiny_config(dataset=f'folder:{root}',
                                        eval_split='val')
  with pytest.raises(train_lib.ConfigError, match='broken.jpg'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_empty_and_imageless_folders_are_config_errors(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  for dataset, match in ((f'folder:{empty}', 'no train/ folder'),
                         (f'folder:{tmp_path / "nope"}', 'no directory')):
    config = train_test_utils.tiny_config(dataset=dataset)
    with pytest.raises(train_lib.ConfigError, match=match):
      train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  (empty / 'train' / 'cat').mkdir(parents=True)
  (empty / 'train' / 'dog').mkdir()
  Image.new('RGB', (8, 8)).save(empty / 'train' / 'cat' / 'a.png')
  (empty / 'train' / 'dog' / 'readme.txt').write_text('no images here')
  config = train_test_utils.tiny_config(dataset=f'folder:{empty}',
                                        folder_bad_files='skip')
  with pytest.raises(train_lib.ConfigError,
                     match=f'class folder {empty}/train/dog holds no'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_folder_batches_shard_over_processes_like_tfds(digits_folder):
  root, _ = digits_folder
  kw = dict(dataset=f'folder:{root}', data_dir=None, global_batch_size=8,
            image_size=16, seed=1, with_index=True, bad_files='skip')
  full = ip.train_iterator(process_index=0, process_count=1, **kw)
  halves = [ip.train_iterator(process_index=i, process_count=2, **kw)
            for i in range(2)]
  for _ in range(2):
    a = next(full)
    b = [next(h) for h in halves]
    np.testing.assert_array_equal(
        np.concatenate([x['index'] for x in b]), a['index'])
    np.testing.assert_array_equal(
        np.concatenate([x['image'] for x in b]), a['image'])
  ev = ip.eval_iterator(dataset=f'folder:{root}', data_dir=None, split='val',
                        global_batch_size=32, image_size=16, bad_files='skip',
                        process_index=0, process_count=1)
  assert len(ev) == 3
  assert sum(float(b['mask'].sum()) for b in ev) == 80


@pytest.mark.slow
def test_trains_and_evaluates_with_recipe_augmentations(digits_folder,
                                                        tmp_path):
  from ghostnet_jax import checkpoint as ckpt_lib
  root, _ = digits_folder
  config = train_test_utils.tiny_config(
      dataset=f'folder:{root}', eval_split='val', folder_bad_files='skip',
      num_train_steps=4, eval_every_steps=0, rand_augment='rand-m9-mstd0.5',
      random_erasing=0.25, mixup=0.8, cutmix=1.0)
  final = train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert final['step'] == 4 and final['eval_examples'] == 80
  assert np.isfinite(final['train_loss']) and final['top1'] is not None
  restored = ckpt_lib.restore_workdir(str(tmp_path / 'w'), 'latest')
  assert restored['meta']['class_names'] == [f'digit_{i}' for i in range(10)]
  assert restored['meta']['dataset'] == f'folder:{root}'
