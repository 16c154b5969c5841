"""The README's Python examples run as written.

Every ```python block of README.md that does not read a file a user would
have to download (an official checkpoint) is executed, and the results it
states in comments are checked where the block makes them checkable.
"""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _blocks():
  text = README.read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
  return [b for b in blocks if '.pth' not in b
          and 'load_pretrained(' not in b]  # downloads: test_pretrained.py


def test_readme_has_runnable_examples():
  assert len(_blocks()) >= 3


@pytest.mark.parametrize('index', range(len(_blocks())))
def test_readme_example_runs(index):
  namespace = {}
  exec(compile(_blocks()[index], f'README.md python block {index}', 'exec'),
       namespace)
  if 'feats' in namespace:  # The research-code example's stated shapes.
    shapes = {k: v.shape for k, v in namespace['feats'].items()}
    assert shapes['stride_32'] == (2, 7, 7, 960)
    assert shapes['pre_logits'] == (2, 1280)
    assert namespace['logits'].shape == (2, 1000)
  if 'baseline' in namespace:  # The GhostConv example's parameter counts.
    import ghostnet_jax
    import jax.numpy as jnp
    x = jnp.zeros((1, 32, 32, 3))
    for model, count in ((namespace['baseline'], 94_538),
                         (namespace['ghost'], 49_322)):
      params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
      assert ghostnet_jax.count_params(params) == count
  if 'maps' in namespace:  # The backbone example's stated levels and shapes.
    assert [m.shape for m in namespace['maps']] == [(2, 16, 16, 24),
                                                    (2, 4, 4, 160)]
    assert [(lv['num_chs'], lv['reduction']) for lv in namespace['info']] == [
        (16, 2), (24, 4), (40, 8), (80, 16), (160, 16)]
  if 'stage' in namespace:  # The G-Ghost example builds a 256-channel stage.
    import jax.numpy as jnp
    out = jax.eval_shape(
        lambda x: namespace['stage'].init_with_output(
            jax.random.key(0), x)[0], jnp.zeros((2, 32, 32, 128)))
    assert out.shape == (2, 16, 16, 256)
