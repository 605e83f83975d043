"""Identity-folder image trees: scanning, image decoding, and the Olivetti download.

A tree is laid out as ``root/IDENTITY/IMAGE``. Images may be greyscale or RGB, of any size
and in any format Pillow reads; they are converted and resized on load.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

OLIVETTI_FOLDER = Path("faces") / "olivetti"


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value ("s2" before "s10")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _fetch_olivetti_faces(data_home: Path) -> tuple[np.ndarray, np.ndarray]:
    """Download the Olivetti faces through scikit-learn; returns (images, targets)."""
    from sklearn.datasets import fetch_olivetti_faces

    bunch = fetch_olivetti_faces(data_home=str(data_home), download_if_missing=True)
    return bunch.images, bunch.target


def write_olivetti_folders(data_dir: Path) -> Path:
    """Write scikit-learn's Olivetti faces as ``<data_dir>/faces/olivetti/s<k>/<n>.png``.

    The folders are built in a temporary directory and moved into place at the end, so an
    interrupted download never leaves a partial tree. Returns the folder.
    """
    target = data_dir / OLIVETTI_FOLDER
    if target.is_dir() and any(target.iterdir()):
        return target
    rank_zero_info(f"Downloading the Olivetti faces with scikit-learn into {target}")
    try:
        images, labels = _fetch_olivetti_faces(data_dir / "faces" / "sklearn")
    except OSError as error:  # urllib's URLError and socket errors are OSErrors
        raise RuntimeError(
            f"No face images found at {data_dir / 'faces' / 'orl'} and the Olivetti download "
            f"into {target} failed ({error}). Connect to the network, or point "
            "--data.init_args.data_dir (or $ZOO_DATA_DIR) at a folder that contains "
            "faces/orl/s1/1.pgm ..., or set --data.init_args.root to your own identity folders."
        ) from error
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".olivetti-"))
    try:
        counts: dict[int, int] = {}
        for image, label in zip(images, labels, strict=True):
            counts[int(label)] = counts.get(int(label), 0) + 1
            folder = staging / f"s{int(label) + 1}"
            folder.mkdir(exist_ok=True)
            pixels = np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{counts[int(label)]}.png")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def scan_identity_folders(root: Path) -> list[tuple[str, list[Path]]]:
    """List ``(identity, files)`` for each sub-folder of ``root``, in natural order.

    Hidden files and folders are ignored.

    Raises:
        FileNotFoundError: if ``root`` is missing or contains no identity folder with a file.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"Face folder {root} not found. Point data.init_args.root (or data_dir, or the "
            "ZOO_DATA_DIR environment variable) at a folder laid out as root/IDENTITY/IMAGE."
        )
    identities = []
    for folder in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
        if files:
            identities.append((folder.name, sorted(files, key=lambda p: natural_key(p.name))))
    if not identities:
        raise FileNotFoundError(
            f"Face folder {root} contains no identity sub-folders with files; expected the "
            "layout root/IDENTITY/IMAGE (for example root/s1/1.pgm)."
        )
    return identities


def load_image(path: Path, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """Read one image as a uint8 (channels, H, W) array resized to ``size`` (height, width).

    Returns the array and the original (width, height).

    Raises:
        OSError: if the file cannot be read or decoded as an image.
    """
    with Image.open(path) as image:
        image.load()
        original = image.size
        converted = image.convert("L" if channels == 1 else "RGB")
    if converted.size != (size[1], size[0]):
        converted = converted.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(converted, dtype=np.uint8)
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)), original


class FaceImages(Dataset):
    """In-memory face images: items are ``(image, label, index)``.

    Images are stored as uint8 and returned as float32 in [-1, 1].
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        image = self.images[index].float() / 127.5 - 1.0
        return image, self.labels[index], index
