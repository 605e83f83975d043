"""Verification of a trained model on a datamodule's pairs, without a Trainer."""

from __future__ import annotations

import torch
from torch import nn

from zoo.face.verification import pair_cosines, verification_metrics


@torch.no_grad()
def evaluate_verification(
    model: nn.Module, datamodule: object, batch_size: int = 100
) -> dict[str, float]:
    """Embed the datamodule's verification images and compute the verification metrics.

    Args:
        model: a :class:`~zoo.face.module.FaceRecognitionModule` (anything with ``embed``
            and ``hparams.num_folds`` / ``hparams.pair_seed``).
        datamodule: a set-up :class:`~zoo.datamodules.faces.FaceDataModule` (anything with
            ``val_set`` and ``verification_pairs``).
        batch_size: images per forward pass.

    Returns:
        The dict of :func:`~zoo.face.verification.verification_metrics`.
    """
    was_training = model.training
    model.eval()
    images = datamodule.val_set
    embeddings = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack(
            [images[i][0] for i in range(start, min(start + batch_size, len(images)))]
        )
        embeddings.append(model.embed(batch))
    model.train(was_training)
    pairs = datamodule.verification_pairs
    scores = pair_cosines(torch.cat(embeddings), pairs)
    return verification_metrics(
        scores,
        pairs[:, 2].bool(),
        num_folds=model.hparams.num_folds,
        seed=model.hparams.pair_seed,
    )
