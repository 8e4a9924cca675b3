"""The EfficientNet-Lite0 network in plain PyTorch, named so that the packaged checkpoint loads
strictly once its keys are renamed (`models.efficientnet.rename_checkpoint_key`).

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed stem and head. The
checkpoint was trained in TensorFlow, whose "same" padding of a strided convolution puts the
odd pixel after the image, not before: those convolutions pad explicitly (`SamePadConv2d`),
and stride-1 ones pad symmetrically, which is the same thing there.

Written here instead of taken from timm: timm imports torchvision's model zoo, about 200 MB of a
worker's memory for one network definition.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the checkpoint was trained with
# Per stage: (blocks, kernel, stride, expansion, output channels). Stage 0 is the depthwise-
# separable block; the others are inverted residuals.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class SamePadConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's "same" padding (the extra pixel at the end)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad the bottom and right by the odd pixel, as TensorFlow does, then convolve."""
        height, width = x.shape[-2:]
        pad_h = _same_padding(int(height), self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(int(width), self.kernel_size[1], self.stride[1])
        x = functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _same_padding(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride > 1:
        return SamePadConv2d(cin, cout, kernel, stride, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class BatchNormAct(nn.BatchNorm2d):
    """Batch norm, then ReLU6 when `act` (the layout of the checkpoint's norm layers)."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise, then activate."""
        return self.act(super().forward(x))


class DepthwiseSeparable(nn.Module):
    """Depthwise convolution, then a pointwise projection (stage 0)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv_dw = _conv(cin, cin, kernel, groups=cin)
        self.bn1 = BatchNormAct(cin)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = BatchNormAct(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block has no shortcut: its channels change."""
        return self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (k x k), project (1x1); a shortcut when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = BatchNormAct(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct(mid)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = BatchNormAct(cout, act=False)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three convolutions, plus the input when the shapes match."""
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + y if self.shortcut else y


class EfficientNetLite0Network(nn.Module):
    """Images (N x 3 x 224 x 224, normalised to [-1, 1]) -> their pooled embedding
    (N x 1280, the input of the classifier) and the 1000 ImageNet logits, in one pass."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv_stem = _conv(3, STEM_CHANNELS, 3, stride=2)
        self.bn1 = BatchNormAct(STEM_CHANNELS)
        stages: list[nn.Module] = []
        cin = STEM_CHANNELS
        for number, (blocks, kernel, stride, expansion, cout) in enumerate(STAGES):
            layers: list[nn.Module] = []
            for index in range(blocks):
                block_stride = stride if index == 0 else 1
                if number == 0:
                    layers.append(DepthwiseSeparable(cin, cout, kernel))
                else:
                    layers.append(InvertedResidual(cin, cout, kernel, block_stride, expansion))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(cin, HEAD_CHANNELS, 1)
        self.bn2 = BatchNormAct(HEAD_CHANNELS)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem, blocks, head, global average pool (the embedding), classifier (the logits)."""
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        pooled = x.mean(dim=(2, 3))
        return pooled, self.classifier(pooled)
