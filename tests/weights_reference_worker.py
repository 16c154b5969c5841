"""Builds reference weight files with the real frameworks, in a subprocess.

    python weights_reference_worker.py paddle SCALE OUT_DIR
    python weights_reference_worker.py mindcv NAME OUT_DIR

``paddle``: PaddleClas's GhostNet (its model file from the ``paddleclas``
package) with random weights and BN statistics, ``paddle.save``d to
``OUT_DIR/model.pdparams``. ``mindcv``: mindcv's ghostnet_* likewise, saved
with ``mindspore.save_checkpoint`` from a training cell (so the file also
holds optimizer ``moments.*`` entries) to ``OUT_DIR/model.ckpt``. Both write
``OUT_DIR/io.npz`` with an NHWC input ``x`` and the framework's ``logits``.

Run apart from the test process: paddle, mindspore and torch each bring their
own native libraries.
"""

import importlib.util
import os
import sys
import types

import numpy as np

IMAGE = 64


def _random_value(name: str, shape, rs, linear_in_out: bool) -> np.ndarray:
  """N(0, 1/fan_in) weights; BN scale/var U(0.5, 1.5); the rest N(0, 0.1)."""
  leaf = name.rsplit('.', 1)[-1]
  if leaf in ('_variance', 'moving_variance') or (
      leaf in ('weight', 'gamma') and len(shape) == 1):
    return rs.uniform(0.5, 1.5, shape)
  if len(shape) >= 2:
    fan_in = shape[0] if (len(shape) == 2 and linear_in_out) else int(
        np.prod(shape[1:]))
    return rs.randn(*shape) / np.sqrt(fan_in)
  return rs.randn(*shape) * 0.1


def _input(seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randn(2, IMAGE, IMAGE, 3).astype(
      np.float32)


def paddle_main(scale: str, out: str) -> None:
  import paddle  # pylint: disable=g-import-not-at-top
  paddle.set_device('cpu')
  spec = importlib.util.find_spec('paddleclas')
  root = spec.submodule_search_locations[0]
  model_file = os.path.join(root, 'ppcls', 'arch', 'backbone', 'model_zoo',
                            'ghostnet.py')
  # The model file imports only loader functions from ppcls (relatively);
  # give it inert ones instead of importing all of PaddleClas.
  package = 'ppcls.arch.backbone.model_zoo'
  parts = package.split('.')
  for i in range(1, len(parts) + 1):
    sys.modules.setdefault('.'.join(parts[:i]),
                           types.ModuleType('.'.join(parts[:i])))
  for mod in ('ppcls.utils', 'ppcls.utils.save_load'):
    sys.modules.setdefault(mod, types.ModuleType(mod))
  loaders = sys.modules['ppcls.utils.save_load']
  loaders.load_dygraph_pretrain = loaders.load_dygraph_pretrain_from_url = None
  mspec = importlib.util.spec_from_file_location(f'{package}.ghostnet',
                                                 model_file)
  module = importlib.util.module_from_spec(mspec)
  mspec.loader.exec_module(module)
  builder = {'0.5': module.GhostNet_x0_5, '1.0': module.GhostNet_x1_0,
             '1.3': module.GhostNet_x1_3}[scale]
  model = builder()
  model.eval()
  rs = np.random.RandomState(7)
  state = model.state_dict()
  new = {k: paddle.to_tensor(_random_value(k, list(v.shape), rs, True)
                             .astype(np.float32)) for k, v in state.items()}
  model.set_state_dict(new)
  x = _input(1)
  with paddle.no_grad():
    logits = model(paddle.to_tensor(np.transpose(x, (0, 3, 1, 2)))).numpy()
  paddle.save(model.state_dict(), os.path.join(out, 'model.pdparams'))
  np.savez(os.path.join(out, 'io.npz'), x=x, logits=logits)


def mindcv_main(name: str, out: str) -> None:
  import mindspore as ms  # pylint: disable=g-import-not-at-top
  from mindspore import nn  # pylint: disable=g-import-not-at-top
  from mindcv.models import ghostnet  # pylint: disable=g-import-not-at-top
  ms.set_context(mode=ms.PYNATIVE_MODE, device_target='CPU')
  net = getattr(ghostnet, name)()
  rs = np.random.RandomState(7)
  for p in net.get_parameters():
    value = _random_value(p.name, tuple(p.shape), rs, False)
    p.set_data(ms.Tensor(value.astype(np.float32)))
  net.set_train(False)
  x = _input(1)
  logits = net(ms.Tensor(np.transpose(x, (0, 3, 1, 2)))).asnumpy()
  # Save through a training cell so optimizer state lands in the file too.
  loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction='mean')
  opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
  train = nn.TrainOneStepCell(nn.WithLossCell(net, loss), opt)
  ms.save_checkpoint(train, os.path.join(out, 'model.ckpt'))
  np.savez(os.path.join(out, 'io.npz'), x=x, logits=logits)


if __name__ == '__main__':
  kind, arg, out_dir = sys.argv[1:4]
  {'paddle': paddle_main, 'mindcv': mindcv_main}[kind](arg, out_dir)
