"""Face-recognition backbones, chosen by name through :func:`build_backbone`.

- ``iresnet18``, ``iresnet34``, ``iresnet50``, ``iresnet100``: the improved ResNet of
  insightface's arcface_torch for 112x112 aligned crops (Deng et al., "ArcFace", CVPR 2019;
  Duta et al., "Improved Residual Networks for Image and Video Recognition", ICPR 2020).
  Stem conv 3x3 with stride 1, four stages of pre-activation blocks
  (BN-conv-BN-PReLU-conv-BN) with stride 2 at the start of each stage, then
  BN-dropout-flatten-linear-BN1d to the embedding. 112x112 input gives a 7x7 map.
- ``small_cnn``: four conv-BN-PReLU stages with max pooling and a linear embedding layer,
  for small greyscale inputs (e.g. 64x64); trains on a 2-core CPU in minutes.

Every backbone maps images (B, in_channels, H, W) to raw embeddings (B, embedding_size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


def _image_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(v) for v in input_size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (height, width), got {input_size!r}.")
    return size[0], size[1]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class IBasicBlock(nn.Module):
    """Pre-activation residual block BN-conv3x3-BN-PReLU-conv3x3-BN with optional downsample."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_planes, eps=1e-5),
            nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
            nn.PReLU(planes),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.downsample(x)


class IResNet(nn.Module):
    """Improved ResNet backbone in the insightface arcface_torch layout.

    Args:
        layers: number of blocks in each of the four stages, e.g. (2, 2, 2, 2) for IResNet-18.
        embedding_size: length of the output embedding (512 in insightface).
        in_channels: image channels (3 for RGB, 1 for greyscale).
        input_size: input height and width; each must be divisible by 16 (112 by default).
        dropout: dropout probability before the embedding layer.
        width: channels of the first stage; later stages double it (64 in insightface).
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        in_channels: int = 3,
        input_size: int | Sequence[int] = 112,
        dropout: float = 0.0,
        width: int = 64,
    ) -> None:
        super().__init__()
        _check_positive(embedding_size=embedding_size, in_channels=in_channels, width=width)
        height, image_width = _image_size(input_size)
        if height % 16 or image_width % 16:
            raise ValueError(
                f"IResNet input_size must be divisible by 16, got {(height, image_width)}; "
                "use 112 for insightface crops."
            )
        if len(layers) != 4:
            raise ValueError(f"layers must list four stage depths, got {list(layers)!r}.")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width, eps=1e-5),
            nn.PReLU(width),
        )
        stages: list[nn.Module] = []
        in_planes = width
        for index, depth in enumerate(layers):
            planes = width * 2**index
            blocks = [IBasicBlock(in_planes, planes, stride=2)]
            blocks += [IBasicBlock(planes, planes) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        feature_count = in_planes * (height // 16) * (image_width // 16)
        self.neck = nn.Sequential(
            nn.BatchNorm2d(in_planes, eps=1e-5),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(feature_count, embedding_size),
            nn.BatchNorm1d(embedding_size, eps=1e-5),
        )
        self.embedding_size = embedding_size
        self.in_channels = in_channels
        self.input_size = (height, image_width)

    def forward(self, images: Tensor) -> Tensor:
        return self.neck(self.stages(self.stem(images)))


class SmallCNN(nn.Module):
    """Four conv-BN-PReLU stages with 2x2 max pooling, then a linear embedding layer.

    Args:
        embedding_size: length of the output embedding.
        in_channels: image channels.
        input_size: input height and width; each must be divisible by 16.
        width: channels of the first stage; later stages double it.
        dropout: dropout probability before the embedding layer.
    """

    def __init__(
        self,
        embedding_size: int = 128,
        in_channels: int = 1,
        input_size: int | Sequence[int] = 64,
        width: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(embedding_size=embedding_size, in_channels=in_channels, width=width)
        height, image_width = _image_size(input_size)
        if height % 16 or image_width % 16:
            raise ValueError(
                f"small_cnn input_size must be divisible by 16, got {(height, image_width)}."
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(4):
            out_channels = width * 2**index
            layers += [
                nn.Conv2d(channels, out_channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.PReLU(out_channels),
                nn.MaxPool2d(2),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        feature_count = channels * (height // 16) * (image_width // 16)
        self.neck = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(feature_count, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        self.embedding_size = embedding_size
        self.in_channels = in_channels
        self.input_size = (height, image_width)

    def forward(self, images: Tensor) -> Tensor:
        return self.neck(self.features(images))


def _iresnet(layers: tuple[int, ...]) -> Callable[..., IResNet]:
    def build(**kwargs: object) -> IResNet:
        return IResNet(layers, **kwargs)  # type: ignore[arg-type]

    return build


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": _iresnet((2, 2, 2, 2)),
    "iresnet34": _iresnet((3, 4, 6, 3)),
    "iresnet50": _iresnet((3, 4, 14, 3)),
    "iresnet100": _iresnet((3, 13, 30, 3)),
    "small_cnn": SmallCNN,
}


def build_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build a backbone by name with keyword arguments, e.g. ``build_backbone("iresnet18")``.

    Raises:
        ValueError: if ``name`` is not registered.
        TypeError: if a keyword argument does not exist for that backbone.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    try:
        return BACKBONES[name](**kwargs)
    except TypeError as error:
        raise TypeError(f"Invalid keyword arguments for backbone {name!r}: {error}") from error


def count_parameters(module: nn.Module) -> int:
    """Return the number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["BACKBONES", "IResNet", "SmallCNN", "build_backbone", "count_parameters"]
