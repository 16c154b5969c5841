"""Mocked tfds datasets for the eval tests (importing registers them).

``ghostnet_eval_mock``: random images of random sizes with 10 classes;
``ghostnet_eval_unlabeled``: images without a label. Neither can be built;
they exist only under :func:`mock` (``tfds.testing.mock_data``, data-source
policy, no TensorFlow), which serves ``N_MOCK`` examples in every split.
"""

import tensorflow_datasets as tfds
from etils import epath

N_MOCK = 29
N_CLASSES = 10


class GhostnetEvalMock(tfds.core.GeneratorBasedBuilder):
  """A 10-class image dataset that exists only under ``mock_data``."""
  VERSION = tfds.core.Version('1.0.0')
  # tfds derives both from the module's package; this module has none.
  code_path = epath.Path(__file__)
  pkg_dir_path = epath.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=N_CLASSES)}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError('mock only')

  def _generate_examples(self):
    raise NotImplementedError('mock only')


class GhostnetEvalUnlabeled(GhostnetEvalMock):
  """Images without labels: nothing to score."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3))}))


def mock():
  """The mocked datasets (a context manager)."""
  return tfds.testing.mock_data(num_examples=N_MOCK,
                                policy=tfds.testing.MockPolicy.USE_CODE)
