"""An independent PyTorch G-Ghost RegNetX, the reference of the parity tests.

Written for the tests from the IJCV 2022 paper's description of the G-Ghost
stage and the structural notes of the project (module names, widths, group
widths), not derived from the Flax code. Its module names are the official
ones, so ``state_dict()`` has the layout of the official checkpoints::

  conv1, bn1                                   stem 3x3/2, 32 channels
  layer1.{j}.{conv1,bn1,conv2,bn2,conv3,bn3}   plain stage
  layer1.0.downsample.{0,1}                    projection shortcut
  layer3.base.*, layer3.end.*                  full-width blocks
  layer3.layers.{j}.*                          intrinsic (narrow) blocks
  layer3.cheap.{0,1}                           1x1 conv + BN of the ghosts
  layer3.merge.{1,2,4,5}                       the mix (0: pool, 3: ReLU)
  fc                                           classifier

Inputs and outputs are NCHW.
"""

from __future__ import annotations

import torch
from torch import nn

# name: (blocks per stage, stage widths, group width)
CONFIGS = {
    'g_ghost_regnetx_002': ((1, 1, 4, 7), (24, 56, 152, 368), 8),
    'g_ghost_regnetx_004': ((1, 2, 7, 12), (32, 64, 160, 384), 16),
    'g_ghost_regnetx_006': ((1, 3, 5, 7), (48, 96, 240, 528), 24),
    'g_ghost_regnetx_008': ((1, 3, 7, 5), (64, 128, 288, 672), 16),
    'g_ghost_regnetx_016': ((2, 4, 10, 2), (72, 168, 408, 912), 24),
    'g_ghost_regnetx_032': ((2, 6, 15, 2), (96, 192, 432, 1008), 48),
    'g_ghost_regnetx_040': ((2, 5, 14, 2), (80, 240, 560, 1360), 40),
    'g_ghost_regnetx_064': ((2, 4, 10, 1), (168, 392, 784, 1624), 56),
    'g_ghost_regnetx_080': ((2, 5, 15, 1), (80, 240, 720, 1920), 120),
    'g_ghost_regnetx_120': ((2, 5, 11, 1), (224, 448, 896, 2240), 112),
    'g_ghost_regnetx_160': ((2, 6, 13, 1), (256, 512, 896, 2048), 128),
    'g_ghost_regnetx_320': ((2, 7, 13, 1), (336, 672, 1344, 2520), 168),
}


class XBlock(nn.Module):
  """RegNetX block: 1x1 -> grouped 3x3 (stride) -> 1x1, residual, ReLU."""

  def __init__(self, cin: int, cout: int, stride: int, group_width: int):
    super().__init__()
    groups = cout // min(cout, group_width)
    self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1,
                           groups=groups, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv3 = nn.Conv2d(cout, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
          nn.BatchNorm2d(cout))
    else:
      self.downsample = None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    skip = x if self.downsample is None else self.downsample(x)
    return torch.relu(y + skip)


class GhostStage(nn.Module):
  """G-Ghost stage: full-width first/last blocks, narrow middle blocks on the
  intrinsic half, ghost half = cheap 1x1 of the first block's output plus the
  mix of the pooled intermediate features."""

  def __init__(self, cin: int, cout: int, depth: int, group_width: int,
               cheap_ratio: float = 0.5):
    super().__init__()
    inner_gw = int(group_width * 0.75)
    self.n_raw = int(cout * (1 - cheap_ratio) / inner_gw) * inner_gw
    n_cheap = cout - self.n_raw
    # Registration order = the official state_dict order.
    self.base = XBlock(cin, cout, 2, group_width)
    self.end = XBlock(cout, cout, 1, group_width)
    mix_in = cout + self.n_raw * (depth - 2)
    self.merge = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(mix_in, n_cheap, 1, bias=False),
        nn.BatchNorm2d(n_cheap),
        nn.ReLU(),
        nn.Conv2d(n_cheap, n_cheap, 1, bias=False),
        nn.BatchNorm2d(n_cheap))
    self.cheap = nn.Sequential(
        nn.Conv2d(n_cheap, n_cheap, 1, bias=False),
        nn.BatchNorm2d(n_cheap))
    self.layers = nn.Sequential(*[
        XBlock(self.n_raw, self.n_raw, 1, inner_gw) for _ in range(depth - 2)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    first = self.base(x)
    intrinsic = first[:, :self.n_raw]
    seen = [first]
    for blk in self.layers:
      intrinsic = blk(intrinsic)
      seen.append(intrinsic)
    mixed = self.merge(torch.cat(seen, dim=1))
    ghost = torch.relu(self.cheap(first[:, self.n_raw:]) + mixed)
    return self.end(torch.cat([intrinsic, ghost], dim=1))


class GGhostRegNetRef(nn.Module):
  """The whole network; ``forward`` maps (N, 3, H, W) to (N, num_classes)."""

  def __init__(self, depths, widths, group_width: int,
               num_classes: int = 1000, drop_rate: float = 0.2):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(32)
    cin = 32
    for i, (depth, width) in enumerate(zip(depths, widths)):
      if i > 0 and depth > 2:
        stage = GhostStage(cin, width, depth, group_width)
      else:
        stage = nn.Sequential(*[
            XBlock(cin if j == 0 else width, width, 2 if j == 0 else 1,
                   group_width) for j in range(depth)])
      setattr(self, f'layer{i + 1}', stage)
      cin = width
    self.dropout = nn.Dropout(drop_rate)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = torch.relu(self.bn1(self.conv1(x)))
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
    x = x.mean(dim=(2, 3))
    return self.fc(self.dropout(x))


def build(name: str, **kwargs) -> GGhostRegNetRef:
  depths, widths, gw = CONFIGS[name]
  return GGhostRegNetRef(depths, widths, gw, **kwargs)
