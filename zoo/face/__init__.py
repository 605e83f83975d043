"""Face recognition: backbones, margin heads, UNPG, verification metrics and the LightningModule.

The LightningModule is imported lazily so that the plain ``nn.Module`` parts load without
Lightning's start-up cost.
"""

from __future__ import annotations

from typing import Any

from zoo.face.backbones import BACKBONES, IResNet, SmallCNN, build_backbone
from zoo.face.heads import HEADS, ArcFace, CosFace, MagFace, MarginHead, build_head
from zoo.face.unpg import UNPGLoss, negative_pair_cosines, tukey_fence_filter
from zoo.face.verification import kfold_accuracy, tar_at_far, verification_metrics

__all__ = [
    "BACKBONES",
    "HEADS",
    "ArcFace",
    "CosFace",
    "FaceRecognitionModule",
    "IResNet",
    "MagFace",
    "MarginHead",
    "SmallCNN",
    "UNPGLoss",
    "build_backbone",
    "build_head",
    "kfold_accuracy",
    "negative_pair_cosines",
    "tar_at_far",
    "tukey_fence_filter",
    "verification_metrics",
]


def __getattr__(name: str) -> Any:
    if name == "FaceRecognitionModule":
        from zoo.face.module import FaceRecognitionModule

        return FaceRecognitionModule
    raise AttributeError(f"module 'zoo.face' has no attribute {name!r}")
