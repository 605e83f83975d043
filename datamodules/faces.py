"""Face datamodule for identity folders (``root/IDENTITY/IMAGE``), split by identity.

Face recognition is open-set, so the split is by person. The first identities in natural
sort order (s2 before s10) train the classifier. The last ``num_val_identities`` are held
out for verification on all their genuine pairs plus an equal number of seeded impostor
pairs. With ``val_bin`` set, an insightface ``.bin`` pair file is the verification set
instead, and every identity folder trains.

Default data: ``<data_dir>/faces/orl`` (the ORL / AT&T faces, 40 people x 10 images of
92x112 pixels). When that folder is absent, the same photos come from scikit-learn's
``fetch_olivetti_faces`` (64x64 crops), written once as identity folders to
``<data_dir>/faces/olivetti``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from zoo.datamodules.paths import resolve_data_dir
from zoo.face.bin_pairs import read_verification_bin
from zoo.face.image_folders import (
    OLIVETTI_FOLDER,
    FaceImages,
    load_image,
    scan_identity_folders,
    write_olivetti_folders,
)
from zoo.face.pairs import make_verification_pairs, save_pairs_csv

logger = logging.getLogger(__name__)

ORL_FOLDER = Path("faces") / "orl"
PAIRS_FILE = "verification_pairs.csv"
# Names of skipped files listed in one warning; the rest are only counted.
MAX_LISTED_SKIPS = 10


class EpochSeededSampler(Sampler[int]):
    """Random permutation that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before each epoch, so a run resumed from a checkpoint
    visits the samples in the same order as an uninterrupted run.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next permutation."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def augment_batch(
    images: Tensor, generator: torch.Generator, max_shift: int = 4, color_jitter: float = 0.0
) -> Tensor:
    """Randomly flip, shift and rescale the intensity of a batch of images in [-1, 1].

    Each image is mirrored with probability 1/2, shifted by up to ``max_shift`` pixels in
    each direction (padding with edge pixels), and, if ``color_jitter`` > 0, its contrast and
    brightness are scaled and offset by factors drawn uniformly from
    [1 - color_jitter, 1 + color_jitter] and [-color_jitter, color_jitter].
    """
    batch, _, height, width = images.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    if max_shift > 0:
        padded = torch.nn.functional.pad(images, [max_shift] * 4, mode="replicate")
        offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator).tolist()
        images = torch.stack(
            [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
        )
    if color_jitter > 0:
        factors = (torch.rand(batch, 2, generator=generator) * 2 - 1) * color_jitter
        contrast = (1 + factors[:, 0]).view(-1, 1, 1, 1).to(images.device)
        brightness = factors[:, 1].view(-1, 1, 1, 1).to(images.device)
        images = (images * contrast + brightness).clamp(-1.0, 1.0)
    return images


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return image_size, image_size
    if (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(v, int) and v > 0 for v in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(
        f"image_size must be a positive int or [height, width], got {image_size!r}; "
        "set it to the backbone's input_size."
    )


class FaceDataModule(pl.LightningDataModule):
    """Identity-folder face data, split by identity into training and verification people.

    Training batches are ``(images, labels, indices)`` with images in [-1, 1], augmented by a
    random flip, shift and intensity change seeded by ``(seed, global_step, rank)``, so a
    resumed run draws the same augmentation as an uninterrupted one. Validation
    batches have the same form; :attr:`verification_pairs` indexes the validation images.

    Args:
        data_dir: data directory; None uses ``$ZOO_DATA_DIR``, else ``~/.cache/zoo/data``.
        root: identity-folder tree, absolute or relative to ``data_dir``. None uses
            ``faces/orl``, or ``faces/olivetti`` downloaded through scikit-learn when the
            ORL folder is absent.
        num_val_identities: number of identities, taken from the end of the natural sort
            order, held out for verification (10 gives ORL's s31-s40). Must be 0 when
            ``val_bin`` is set.
        num_identities: use only the first ``num_identities`` identities in natural sort
            order and ignore the rest; None uses all. With ORL, ``num_identities=30`` and
            ``num_val_identities=5`` train on s1-s25 and verify on s26-s30, a split for
            choosing hyperparameters that never reads the test identities s31-s40.
        val_bin: optional insightface ``.bin`` pair file used as the verification set.
        image_size: (height, width) or one int that images are resized to; must equal the
            backbone's ``input_size``.
        channels: 1 for greyscale, 3 for RGB.
        batch_size: training and validation batch size per process.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling, the augmentation and the impostor-pair draw.
        augment: augment training batches (see ``max_shift`` and ``color_jitter``).
        max_shift: largest random shift in pixels of the augmentation.
        color_jitter: largest relative change of contrast and brightness of the augmentation.
        download: allow the scikit-learn download when ``root`` is None and ORL is absent.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        root: str | None = None,
        num_val_identities: int = 10,
        num_identities: int | None = None,
        val_bin: str | None = None,
        image_size: int | list[int] = 64,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        max_shift: int = 4,
        color_jitter: float = 0.0,
        download: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_size = _image_size(image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}.")
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}.")
        if not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative integer, got {max_shift!r}.")
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter!r}.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        if not isinstance(num_val_identities, int) or num_val_identities < 0:
            raise ValueError(
                f"num_val_identities must be a non-negative integer, got {num_val_identities!r}."
            )
        if num_identities is not None and (
            not isinstance(num_identities, int) or num_identities < 2
        ):
            raise ValueError(
                f"num_identities must be None or an integer >= 2, got {num_identities!r}."
            )
        if val_bin is None and num_val_identities == 0:
            raise ValueError("num_val_identities=0 needs a val_bin pair file for verification.")
        if val_bin is not None and num_val_identities != 0:
            raise ValueError(
                f"Set num_val_identities=0 when val_bin is given (got {num_val_identities}), "
                "because the .bin file replaces the held-out identities."
            )
        self.train_set: FaceImages | None = None
        self.val_set: FaceImages | None = None
        self.verification_pairs: Tensor | None = None
        self.val_names: list[str] = []
        self.train_identities: list[str] = []

    @property
    def num_classes(self) -> int:
        """Number of training identities (available after :meth:`setup`)."""
        if self.train_set is None:
            raise RuntimeError("Call setup() before reading num_classes.")
        return len(self.train_identities)

    def resolve_root(self) -> Path:
        """Return the identity-folder tree this datamodule reads."""
        data_dir = resolve_data_dir(self.hparams.data_dir)
        if self.hparams.root is not None:
            root = Path(self.hparams.root).expanduser()
            return root if root.is_absolute() else data_dir / root
        if (data_dir / ORL_FOLDER).is_dir() or not self.hparams.download:
            return data_dir / ORL_FOLDER
        return data_dir / OLIVETTI_FOLDER

    def prepare_data(self) -> None:
        data_dir = resolve_data_dir(self.hparams.data_dir)
        if self.resolve_root() == data_dir / OLIVETTI_FOLDER:
            write_olivetti_folders(data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self.resolve_root()
        identities = scan_identity_folders(root)
        if self.hparams.num_identities is not None:
            identities = identities[: self.hparams.num_identities]
        held_out = self.hparams.num_val_identities
        if held_out >= len(identities):
            raise ValueError(
                f"num_val_identities={held_out} leaves no training identity: {root} has "
                f"{len(identities)} identities. Lower num_val_identities."
            )
        train_ids = identities[: len(identities) - held_out]
        val_ids = identities[len(identities) - held_out :]
        images, labels, names = self._load(root, train_ids + val_ids)
        is_val = labels >= len(train_ids)
        self.train_identities = [name for name, _ in train_ids]
        self.train_set = FaceImages(images[~is_val], labels[~is_val])
        self._check_batch_size(len(self.train_set))
        if self.hparams.val_bin is not None:
            self._setup_bin()
        else:
            val_labels = labels[is_val] - len(train_ids)
            self.val_set = FaceImages(images[is_val], val_labels)
            self.val_names = [n for n, v in zip(names, is_val.tolist(), strict=True) if v]
            self._warn_single_image(val_ids)
            self.verification_pairs = make_verification_pairs(val_labels, self.hparams.seed)
        self._save_pairs()
        rank_zero_info(
            f"Face data from {root}: {len(train_ids)} training identities "
            f"({len(self.train_set)} images), {len(self.val_set)} verification images, "
            f"{int(self.verification_pairs[:, 2].sum())} genuine and "
            f"{int((1 - self.verification_pairs[:, 2]).sum())} impostor pairs."
        )

    def _load(
        self, root: Path, identities: list[tuple[str, list[Path]]]
    ) -> tuple[Tensor, Tensor, list[str]]:
        arrays, labels, names, skipped, sizes = [], [], [], [], set()
        for label, (identity, files) in enumerate(identities):
            for path in files:
                try:
                    array, size = load_image(path, self.hparams.channels, self.image_size)
                except (OSError, UnidentifiedImageError, ValueError) as error:
                    skipped.append((path, error))
                    continue
                arrays.append(array)
                labels.append(label)
                names.append(f"{identity}/{path.name}")
                sizes.add(size)
        self._report_skipped(root, skipped)
        if not arrays:
            raise FileNotFoundError(f"No readable image found under {root}.")
        used = sorted({label for label in labels})
        if len(used) < len(identities):
            empty = [identities[i][0] for i in range(len(identities)) if i not in set(used)]
            raise ValueError(
                f"Identity folders {empty} under {root} have no readable image; remove them or "
                "add images."
            )
        height, width = self.image_size
        if sizes != {(width, height)}:
            rank_zero_info(
                f"Resizing {len(arrays)} face images from sizes (width x height) "
                f"{sorted(sizes)[:5]} to {width}x{height} (backbone input)."
            )
        return torch.from_numpy(np.stack(arrays)), torch.tensor(labels), names

    def _report_skipped(self, root: Path, skipped: list[tuple[Path, Exception]]) -> None:
        for path, error in skipped[:MAX_LISTED_SKIPS]:
            rank_zero_warn(f"Skipping unreadable or non-image file {path}: {error}")
        if skipped:
            rank_zero_warn(f"Skipped {len(skipped)} unreadable or non-image file(s) under {root}.")

    def _warn_single_image(self, identities: list[tuple[str, list[Path]]]) -> None:
        single = [name for name, files in identities if len(files) == 1]
        if single:
            rank_zero_warn(
                f"Verification identities {single} have one image each; they appear only in "
                "impostor pairs. Add images to use them in genuine pairs."
            )

    def _check_batch_size(self, train_count: int) -> None:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_process = train_count // world_size
        if per_process < self.hparams.batch_size:
            raise ValueError(
                f"batch_size={self.hparams.batch_size} exceeds the {per_process} training "
                f"images per process ({train_count} over {world_size} process(es)); lower "
                "data.init_args.batch_size."
            )

    def _setup_bin(self) -> None:
        images, issame = read_verification_bin(
            self.hparams.val_bin, self.image_size, self.hparams.channels
        )
        count = len(issame)
        self.val_set = FaceImages(images, torch.full((2 * count,), -1, dtype=torch.long))
        self.val_names = [f"{Path(self.hparams.val_bin).name}#{i}" for i in range(2 * count)]
        left = torch.arange(count) * 2
        self.verification_pairs = torch.stack([left, left + 1, issame.long()], dim=1)

    def pairs_folder(self) -> Path | None:
        """Return the run folder that receives the pair list, or None when the run has none.

        The folder is the first logger's log folder. Without a logger it is the Trainer's
        ``default_root_dir`` if checkpointing is on, because that is where the checkpoints
        go. A Trainer with neither writes no files, and its ``default_root_dir`` defaults to
        the current directory, so the pair list is not written then.
        """
        trainer = self.trainer
        if trainer is None:
            return None
        # Trainer.log_dir broadcasts from rank zero, so every rank must read it.
        log_dir = trainer.log_dir
        if trainer.loggers:
            return Path(log_dir)
        if trainer.checkpoint_callback is not None:
            return Path(trainer.default_root_dir)
        return None

    def _save_pairs(self) -> None:
        folder = self.pairs_folder()
        if folder is None:
            if self.trainer is not None:
                rank_zero_info(
                    "Not saving the verification pairs: the Trainer has no logger and no "
                    "checkpointing, so the run has no folder."
                )
            return
        if self.trainer.is_global_zero:
            save_pairs_csv(self.verification_pairs, self.val_names, folder / PAIRS_FILE)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=EpochSeededSampler(len(self.train_set), self.hparams.seed),
            num_workers=self.hparams.num_workers,
            drop_last=True,
            # A DataLoader without a generator draws its worker base seed from the global
            # torch RNG each epoch, which shifts dropout masks after a resume.
            generator=torch.Generator().manual_seed(self.hparams.seed),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if not (self.hparams.augment and trainer is not None and trainer.training):
            return batch
        images, labels, indices = batch
        seed = (self.hparams.seed * 1_000_003 + trainer.global_step) * 64 + trainer.global_rank
        generator = torch.Generator().manual_seed(seed)
        images = augment_batch(images, generator, self.hparams.max_shift, self.hparams.color_jitter)
        return images, labels, indices
