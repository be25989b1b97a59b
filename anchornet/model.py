"""AnchorNet: the padding-free patch-proposal network of paper Table 1."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from anchornet.layers import IMAGENET_MEAN, IMAGENET_STD, ConvBnAct, MBConv, Normalize, ShortcutCrop, SqueezeExcite
from anchornet.receptive_field import ReceptiveField, receptive_field_of

__all__ = ["TABLE1", "AnchorNet", "MBConvConfig", "anchornet_test"]


@dataclass(frozen=True)
class MBConvConfig:
    """One row of Table 1: an MBConv with its kernel, expansion ratio, output width and stride."""

    kernel: int
    expand_ratio: float
    out_channels: int
    stride: int


#: Stem: 3 x 3 conv, 16 channels, stride 2. Blocks B1..B7 as in paper Table 1.
TABLE1_STEM = (3, 16, 2)
TABLE1: tuple[MBConvConfig, ...] = (
    MBConvConfig(3, 1.0, 16, 2),
    MBConvConfig(3, 3.0, 24, 2),
    MBConvConfig(3, 4.0, 24, 1),
    MBConvConfig(3, 4.0, 48, 1),
    MBConvConfig(3, 2.0, 96, 1),
    MBConvConfig(3, 1.5, 96, 1),
    MBConvConfig(3, 1.5, 96, 1),
)


class AnchorNet(nn.Module):
    """Padding-free MBConv extractor, 1x1 head conv, global average pooling and a linear classifier.

    Every convolution has ``padding=0``, so each cell of the final feature map sees exactly one
    ``K x K`` input window (``self.receptive_field``; K = 95, S = 8 for Table 1).

    Args:
        num_classes: outputs of the classifier.
        se: add squeeze-excitation to every block, as the authors' released code does (0.675 M parameters,
            60.5 M MACs at 224 with 1000 classes). **With SE the mapping is no longer exact**: SE pools the
            whole map, so every cell depends on every input pixel.
        shortcut_crop: how residual shortcuts are cropped to the smaller block output, ``"center"``
            (aligned, default) or ``"top_left"`` (the released code).
        head_channels: width of the 1x1 head convolution.
        blocks: the block table; Table 1 by default.
        stem: ``(kernel, channels, stride)`` of the stem convolution.
        in_channels: channels of the input images.
        mean, std: input normalisation applied first, one value per input channel: the model takes ``[0, 1]``
            tensors (RGB by default).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        se: bool = False,
        shortcut_crop: ShortcutCrop = "center",
        head_channels: int = 512,
        blocks: tuple[MBConvConfig, ...] = TABLE1,
        stem: tuple[int, int, int] = TABLE1_STEM,
        in_channels: int = 3,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not len(mean) == len(std) == in_channels:
            raise ValueError(
                f"mean and std need one value per input channel ({in_channels}), got {len(mean)} and {len(std)}"
            )
        blocks = tuple(b if isinstance(b, MBConvConfig) else MBConvConfig(*b) for b in blocks)
        self._config: dict[str, Any] = {
            "num_classes": num_classes,
            "se": se,
            "shortcut_crop": shortcut_crop,
            "head_channels": head_channels,
            "blocks": [list(asdict(b).values()) for b in blocks],
            "stem": list(stem),
            "in_channels": in_channels,
            "mean": list(mean),
            "std": list(std),
        }
        stem_kernel, stem_channels, stem_stride = stem
        se_layer = partial(SqueezeExcite, act_layer=nn.SiLU) if se else None
        self.normalize = Normalize(tuple(mean), tuple(std))
        layers: list[nn.Module] = [ConvBnAct(in_channels, stem_channels, stem_kernel, stem_stride)]
        width = stem_channels
        for cfg in blocks:
            layers.append(
                MBConv(
                    width,
                    cfg.out_channels,
                    cfg.kernel,
                    cfg.stride,
                    cfg.expand_ratio,
                    se_layer=se_layer,
                    shortcut_crop=shortcut_crop,
                )
            )
            width = cfg.out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, head_channels, 1, padding=0, bias=True)
        self.classifier = nn.Linear(head_channels, num_classes)
        self.num_classes = num_classes
        self.num_features = head_channels
        # The grid is shaped by forward_features; the classifier acts on the pooled map.
        self.receptive_field: ReceptiveField = receptive_field_of(
            nn.Sequential(self.normalize, self.features, self.head), skip=(SqueezeExcite,)
        )
        self._init_weights()

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON-able values: ``AnchorNet(**model.config)`` rebuilds it."""
        return dict(self._config)

    @property
    def exact(self) -> bool:
        """Whether every output cell depends only on its receptive-field window (false with SE)."""
        return not self._config["se"]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` RGB images ``(B, C, H, W)`` to the pre-pooling map ``F``, ``(B, head_channels, rows, cols)``."""
        if x.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        self.receptive_field.check_input(x.shape[-2], x.shape[-1])
        return self.head(self.features(self.normalize(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling and the linear classifier: ``F`` to logits ``(B, num_classes)``."""
        return self.classifier(features.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def anchornet_test(num_classes: int = 10, **kwargs: Any) -> AnchorNet:
    """A tiny AnchorNet with the same receptive field as Table 1 (K = 95, S = 8), for fast tests."""
    blocks = tuple(MBConvConfig(b.kernel, 1.0, 8, b.stride) for b in TABLE1)
    return AnchorNet(num_classes, head_channels=16, blocks=blocks, stem=(3, 8, 2), **kwargs)
