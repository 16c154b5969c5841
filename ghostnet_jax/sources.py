"""Every known public weight file of the registered models.

``load_pretrained(name, source)`` (:mod:`ghostnet_jax.pretrained`) picks one of
these. Facts (URLs, formats, accuracies, preprocessing) are the publishers'
(see ``shared/reference/weight-sources.md`` of the project); hashes are given
only where they were published or known from the hosting service.

Each source names a *format* (how the file is read, :mod:`weight_readers`)
and a *layout* (how its names map onto the official PyTorch names our models
use, :mod:`weight_mappings`). ``verified`` says how the reader and mapping are
proven in the tests (no weight file can be downloaded there).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ghostnet_jax.registry import EvalConfig, get_entry

# Formats a source file can have.
FORMATS = ('safetensors', 'torch', 'pdparams', 'mindspore', 'tf')
# Model fields a key layout's weights need: the TF checkpoint was trained
# with TF 'SAME' padding (GhostNet v1's ``padding`` field).
LAYOUT_MODEL_KWARGS: dict[str, dict[str, Any]] = {'tf': {'padding': 'tf_same'}}


@dataclasses.dataclass(frozen=True)
class WeightSource:
  """One published weight file of one model.

  Attributes:
    model: registered model name.
    tag: short id, unique per model (``source=`` of ``load_pretrained``).
    url: where the file is published; ``hf-hub:ORG/REPO`` for the Hub.
    format: one of :data:`FORMATS`.
    layout: the key layout (``official``, ``timm``, ``paddle``, ``mindcv``,
      ``ms_zoo``, ``tf``), see :mod:`ghostnet_jax.weight_mappings`.
    top1: ImageNet top-1 (%) reported by the publisher.
    preprocess: the publisher's eval preprocessing, in words.
    eval_config: the same as an :class:`EvalConfig` (resize, crop, mean/std).
    sha256: full SHA-256 of the file, where known.
    sha256_prefix: a published prefix of it (mindcv file names).
    size: byte size, where known.
    filename: name of the file inside ``hf-hub`` repos / the download cache.
    revision: Hub commit for ``hf-hub`` sources.
    ema: which weights of a training checkpoint (``None``: EMA if present).
    loadable: False where no exact mapping onto our model exists yet.
    verified: how the loader of this source is proven.
    notes: anything else a user should know.

  ``model_kwargs`` (a property, from the layout) gives the fields of
  ``create_model`` the weights need, e.g. ``{'padding': 'tf_same'}``.
  """
  model: str
  tag: str
  url: str
  format: str
  layout: str
  top1: float | None
  preprocess: str
  eval_config: EvalConfig = EvalConfig()
  sha256: str | None = None
  sha256_prefix: str | None = None
  size: int | None = None
  filename: str | None = None
  revision: str | None = None
  ema: bool | None = None
  loadable: bool = True
  verified: str = ''
  notes: str = ''

  @property
  def model_kwargs(self) -> dict[str, Any]:
    """Fields of ``create_model(model, **model_kwargs)`` these weights need
    (``{'padding': 'tf_same'}`` for the TensorFlow checkpoint)."""
    return dict(LAYOUT_MODEL_KWARGS.get(self.layout, {}))

  @property
  def file_name(self) -> str:
    """The name the file is cached under."""
    if self.filename:
      return self.filename
    return self.url.rstrip('/').rsplit('/', 1)[-1]


_GH = 'https://github.com/huawei-noah'
_EAB = f'{_GH}/Efficient-AI-Backbones/releases/download'
_PADDLE = 'https://paddle-imagenet-models-name.bj.bcebos.com/dygraph'
_MINDCV = 'https://download.mindspore.cn/toolkits/mindcv/ghostnet'
_MSZOO = 'https://download.mindspore.cn/models'

_TORCHVISION = 'PIL RGB, resize short side 256 bilinear, center crop 224, ImageNet mean/std'
_TIMM = 'resize short side 256 (crop 0.875) bicubic, center crop 224, ImageNet mean/std'
_PADDLE_PRE = ('cv2 decode -> RGB, resize short side 256 (cv2 INTER_LINEAR), '
               'center crop 224, ImageNet mean/std')
_MS_PRE = 'decode RGB, resize 256 bilinear, center crop 224, ImageNet mean/std'
_TF_PRE = ('cv2 decode (BGR), resize short side 256 INTER_CUBIC, center crop '
           '224, mean/std in BGR order')

BILINEAR = EvalConfig(interpolation='bilinear')
BICUBIC = EvalConfig(interpolation='bicubic')

V_TIMM = 'reader+mapping: logits equal timm on random weights (safetensors, HF cache)'
V_TORCH = ('reader+mapping: torch-free zip reader equals torch.load; logits '
           'equal timm / official code on random weights')
V_PADDLE = ('reader+mapping: logits equal PaddleClas GhostNet (paddlepaddle '
            'CPU) on random weights and BN stats, file from paddle.save')
V_MINDCV = ('reader+mapping: logits equal the reference on random weights; '
            'file from mindspore.save_checkpoint')
V_MSZOO = ('reader+mapping: names from the model zoo code; file built in the '
           'documented ckpt format (not from the zoo network)')
V_TF = ('reader+mapping: logits of GhostNet(padding=\'tf_same\') equal a '
        'TensorFlow reference of the TF network (tf.nn convs, SAME padding, '
        'BGR input) on random weights and BN stats, bundle written by TF '
        'under the official checkpoint\'s 435 variable names and shapes')


def _hf(model: str, repo: str, top1: float, *, revision: str | None = None,
        sha256: str | None = None, size: int | None = None,
        notes: str = '') -> WeightSource:
  return WeightSource(
      model=model, tag='timm', url=f'hf-hub:{repo}', format='safetensors',
      layout='timm', top1=top1, preprocess=_TIMM, eval_config=BICUBIC,
      filename='model.safetensors', revision=revision, sha256=sha256,
      size=size, verified=V_TIMM, notes=notes)


def _paddle(model: str, tag: str, file: str, top1: float) -> WeightSource:
  return WeightSource(
      model=model, tag=tag, url=f'{_PADDLE}/{file}', format='pdparams',
      layout='paddle', top1=top1, preprocess=_PADDLE_PRE,
      eval_config=BILINEAR, verified=V_PADDLE,
      notes='TF-style GhostNet (clip SE gate, SE width mid//4, head conv+BN), '
      'mapped exactly: SE weights rescaled and zero-padded, head BN folded')


def _mindcv(model: str, file: str, top1: float, notes: str = '') -> WeightSource:
  prefix = file.split('-')[1].split('.')[0]
  return WeightSource(
      model=model, tag='mindcv', url=f'{_MINDCV}/{file}', format='mindspore',
      layout='mindcv', top1=top1, preprocess=_MS_PRE, eval_config=BILINEAR,
      sha256_prefix=prefix, verified=V_MINDCV, notes=notes)


_SOURCES: tuple[WeightSource, ...] = (
    # ----------------------------------------------------------- GhostNet 0.5x
    _paddle('ghostnet_050', 'paddle', 'GhostNet_x0_5_pretrained.pdparams', 66.88),
    _mindcv('ghostnet_050', 'ghostnet_050-85b91860.ckpt', 66.03),
    # ----------------------------------------------------------- GhostNet 1.0x
    _hf('ghostnet_100', 'timm/ghostnet_100.in1k', 73.958,
        revision='700dcdf6314c1b68f170e6ba1ee85ee94e5b37b5',
        sha256='8efbcf55d97872c828768b096d4ebebc51f8b7e29623fd3b3933d78cc230e2e2',
        notes='the official weights re-saved by timm'),
    WeightSource(
        model='ghostnet_100', tag='official',
        url=f'{_GH}/ghostnet/raw/master/ghostnet_pytorch/models/'
        'state_dict_73.98.pth',
        format='torch', layout='official', top1=73.98,
        preprocess=_TORCHVISION, eval_config=BILINEAR, verified=V_TORCH),
    _paddle('ghostnet_100', 'paddle', 'GhostNet_x1_0_pretrained.pdparams', 74.02),
    _mindcv('ghostnet_100', 'ghostnet_100-bef8025a.ckpt', 73.78),
    WeightSource(
        model='ghostnet_100', tag='mindspore_zoo',
        url=f'{_MSZOO}/r1.10/ghostnet_ascend_v1100_imagenet2012_research_cv_'
        'top1acc74.19_top5acc91.78.ckpt',
        format='mindspore', layout='ms_zoo', top1=74.19, preprocess=_MS_PRE,
        eval_config=BILINEAR,
        sha256='2c1db3f228a130e382356514215c388c2ebf758a637eee76e87e3f6562c4e663',
        verified=V_MSZOO,
        notes='MindSpore model zoo research/cv/ghostnet; optimizer moments '
        'ignored'),
    WeightSource(
        model='ghostnet_100', tag='tf',
        url=f'{_GH}/ghostnet/raw/master/ghostnet_tensorflow/models/'
        'ghostnet_checkpoint.index',
        format='tf', layout='tf', top1=73.93, preprocess=_TF_PRE,
        eval_config=BICUBIC, verified=V_TF,
        notes="build the model with create_model('ghostnet_100', "
        "padding='tf_same') (TF SAME padding, asymmetric at stride 2); "
        'TF-style GhostNet mapped exactly like PaddleClas\'s; stem flipped '
        'to RGB, so feed RGB images with the ImageNet mean/std; reading '
        'needs TensorFlow (the export extra); the data shard '
        'ghostnet_checkpoint.data-00000-of-00001 is fetched next to the '
        'index'),
    # ----------------------------------------------------------- GhostNet 1.3x
    _paddle('ghostnet_130', 'paddle_ssld',
            'GhostNet_x1_3_ssld_pretrained.pdparams', 79.38),
    _paddle('ghostnet_130', 'paddle', 'GhostNet_x1_3_pretrained.pdparams', 75.79),
    _mindcv('ghostnet_130', 'ghostnet_130-cf4c235c.ckpt', 75.50),
    # -------------------------------------------------------------- GhostNetV2
    _hf('ghostnetv2_100', 'timm/ghostnetv2_100.in1k', 75.186),
    WeightSource(
        model='ghostnetv2_100', tag='official',
        url=f'{_EAB}/GhostNetV2/ck_ghostnetv2_10.pth.tar', format='torch',
        layout='official', top1=75.3, preprocess=_TIMM, eval_config=BICUBIC,
        verified=V_TORCH, notes='thop total_ops/total_params buffers dropped'),
    _hf('ghostnetv2_130', 'timm/ghostnetv2_130.in1k', 76.746),
    WeightSource(
        model='ghostnetv2_130', tag='official',
        url=f'{_EAB}/GhostNetV2/ck_ghostnetv2_13.pth.tar', format='torch',
        layout='official', top1=76.9, preprocess=_TIMM, eval_config=BICUBIC,
        verified=V_TORCH, notes='thop total_ops/total_params buffers dropped'),
    _hf('ghostnetv2_160', 'timm/ghostnetv2_160.in1k', 77.836,
        revision='f29f8843944b3f614fbea96f3847e88080f9ed27'),
    WeightSource(
        model='ghostnetv2_160', tag='official',
        url=f'{_EAB}/GhostNetV2/ck_ghostnetv2_16.pth.tar', format='torch',
        layout='official', top1=77.8, preprocess=_TIMM, eval_config=BICUBIC,
        verified=V_TORCH, notes='thop total_ops/total_params buffers dropped'),
    # -------------------------------------------------------------- GhostNetV3
    WeightSource(
        model='ghostnetv3_100', tag='official_ema',
        url=f'{_EAB}/GhostNetV3/ghostnetv3-1.0.pth.tar', format='torch',
        layout='official', top1=77.13, preprocess=_TIMM, eval_config=BICUBIC,
        ema=True, verified=V_TORCH,
        notes='state_dict_ema of the release file (the paper\'s 77.1)'),
    WeightSource(
        model='ghostnetv3_100', tag='official',
        url=f'{_EAB}/GhostNetV3/ghostnetv3-1.0.pth.tar', format='torch',
        layout='official', top1=76.93, preprocess=_TIMM, eval_config=BICUBIC,
        ema=False, verified=V_TORCH,
        notes='state_dict (non-EMA) of the release file'),
    _hf('ghostnetv3_100', 'timm/ghostnetv3_100.in1k', 76.936,
        notes='non-EMA weights, timm names (bn1 in branches)'),
) + tuple(
    WeightSource(
        model=f'g_ghost_regnetx_{code}', tag='official',
        url=f'{_EAB}/g_ghost_regnet/g_ghost_regnet_{gf}g_{top1}.pth',
        format='torch', layout='official', top1=top1,
        preprocess=_TORCHVISION, eval_config=BILINEAR, verified=V_TORCH,
        notes='download URL pattern unverified (release g_ghost_regnet); '
        "'module.' prefixes stripped")
    for code, gf, top1 in (('032', '3.2', 77.8), ('040', '4.0', 78.6),
                           ('080', '8.0', 79.0), ('160', '16.0', 79.9)))


def _check_table() -> None:
  seen = set()
  for s in _SOURCES:
    get_entry(s.model)
    if (s.model, s.tag) in seen:
      raise ValueError(f'Source {s.model}:{s.tag} is registered twice.')
    if s.format not in FORMATS:
      raise ValueError(f'Source {s.model}:{s.tag}: unknown format {s.format}.')
    seen.add((s.model, s.tag))


def list_sources(model: str | None = None) -> list[WeightSource]:
  """Registered sources of ``model`` (all if None), best first per model."""
  if model is not None:
    get_entry(model)
  return [s for s in _SOURCES if model is None or s.model == model]


def default_source(model: str) -> WeightSource | None:
  """The source ``load_pretrained(model)`` uses: the first loadable one."""
  for s in list_sources(model):
    if s.loadable:
      return s
  return None


def get_source(model: str, tag: str) -> WeightSource:
  """The source ``tag`` of ``model``; a ValueError listing the tags."""
  for s in list_sources(model):
    if s.tag == tag:
      return s
  tags = [s.tag for s in list_sources(model)]
  raise ValueError(
      f'Unknown source {tag!r} for {model}. Registered sources: '
      f'{", ".join(tags) if tags else "none"}; or pass a local file, an '
      'http(s) URL or hf-hub:ORG/REPO.')
