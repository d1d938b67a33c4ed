"""MobileFaceNet with arcface_torch's exact parameter layout (`mbf`: blocks (1, 4, 6, 2), scale 2).

Every channel count is a multiple of one `unit` (64 at width 1): the stem has `unit * scale` channels, the
depthwise expansions have 1/2/4 units, the embedding convolution 8 units. Scaling the unit by `width`
therefore keeps every grouped convolution valid while reproducing arcface_torch exactly at width 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from pipeline.models.iresnet import check_input_size, scaled_channels

MBF_BLOCKS = (1, 4, 6, 2)
MBF_SCALE = 2


class ConvBNPReLU(nn.Module):
    """conv -> BN -> PReLU, stored as `layers.{0,1,2}` like arcface_torch's ConvBlock."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvBN(nn.Module):
    """conv -> BN without activation (arcface_torch's LinearBlock)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 padding: int | None = None):
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride, padding=pad, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden` -> depthwise 3x3 -> 1x1 linear projection (+ skip)."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int, residual: bool):
        super().__init__()
        if residual and (stride != 1 or cin != cout):
            raise ValueError("a residual bottleneck must keep shape")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBNPReLU(cin, hidden),
            ConvBNPReLU(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            ConvBN(hidden, cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """`count` shape-preserving residual bottlenecks."""

    def __init__(self, channels: int, count: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            *(Bottleneck(channels, channels, hidden, stride=1, residual=True) for _ in range(count))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GlobalDepthwiseHead(nn.Module):
    """GDC head: depthwise conv over the whole map -> flatten (-> dropout) -> linear -> BN1d."""

    def __init__(self, channels: int, side: int, num_features: int, dropout: float):
        super().__init__()
        # Index 1 has no parameters, so adding dropout there leaves the state_dict keys untouched.
        self.layers = nn.Sequential(
            ConvBN(channels, channels, kernel=side, groups=channels, padding=0),
            nn.Sequential(nn.Flatten(1), nn.Dropout(p=dropout)),
            nn.Linear(channels, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone; defaults reproduce arcface_torch's `mbf`."""

    def __init__(
        self,
        num_features: int = 512,
        input_size: int = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
        blocks: Sequence[int] = MBF_BLOCKS,
        scale: int = MBF_SCALE,
    ):
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1 or scale < 1:
            raise ValueError(f"mbf needs four block counts >= 1 and scale >= 1, got {blocks}, {scale}")
        self.fp16 = fp16
        self.num_features, self.input_size = num_features, input_size
        unit = scaled_channels(64, width)
        narrow, wide = unit * scale, 2 * unit * scale
        side = check_input_size(input_size) // 16

        stem2 = (
            ConvBNPReLU(narrow, narrow, kernel=3, groups=unit)
            if blocks[0] == 1
            else ResidualStack(narrow, blocks[0], hidden=2 * unit)
        )
        self.layers = nn.ModuleList([
            ConvBNPReLU(3, narrow, kernel=3, stride=2),
            stem2,
            Bottleneck(narrow, narrow, hidden=2 * unit, stride=2, residual=False),
            ResidualStack(narrow, blocks[1], hidden=2 * unit),
            Bottleneck(narrow, wide, hidden=4 * unit, stride=2, residual=False),
            ResidualStack(wide, blocks[2], hidden=4 * unit),
            Bottleneck(wide, wide, hidden=8 * unit, stride=2, residual=False),
            ResidualStack(wide, blocks[3], hidden=4 * unit),
        ])
        self.conv_sep = ConvBNPReLU(wide, 8 * unit)
        self.features = GlobalDepthwiseHead(8 * unit, side, num_features, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Like arcface_torch: the body may run in fp16, the 1x1 embedding conv and head in fp32.
        use_amp = self.fp16 and x.is_cuda
        with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
            for layer in self.layers:
                x = layer(x)
        return self.features(self.conv_sep(x.float()))


def mobilefacenet(name: str = "mbf", **kwargs) -> MobileFaceNet:
    """Build `mbf` (see MobileFaceNet for keyword arguments)."""
    if name != "mbf":
        raise ValueError(f"unknown MobileFaceNet variant {name!r}")
    return MobileFaceNet(**kwargs)
