"""Reader for insightface verification pair files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``).

Such a file is a pickle of ``(images, issame)``. ``images`` is a list of 2 * P encoded image
byte strings (JPEG or PNG), and images 2k and 2k + 1 form pair k. ``issame`` is a list or
numpy array of P booleans. Loading uses a restricted unpickler that accepts only the
globals needed for bytes and numpy boolean arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

# Globals that the pickles written by insightface's tools reference: byte strings from
# Python 2 pickles (``_codecs.encode``) and numpy arrays of booleans.
_ALLOWED_GLOBALS = {
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "bool"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"Rejected the global {module}.{name} in a verification .bin file. Only byte "
                "strings and boolean arrays are allowed, so the file is corrupt or unsafe."
            )
        return super().find_class(module, name)


def _as_bool_list(issame: Any, path: Path) -> list[bool]:
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise ValueError(
                f"{path}: issame must be a 1-D boolean array, got dtype {issame.dtype} "
                f"and shape {issame.shape}."
            )
        return [bool(v) for v in issame]
    if isinstance(issame, list | tuple) and all(isinstance(v, bool | np.bool_) for v in issame):
        return [bool(v) for v in issame]
    raise ValueError(f"{path}: issame must be a list of booleans, got {type(issame).__name__}.")


def read_verification_bin(
    path: str | Path, image_size: tuple[int, int] | None = None, channels: int = 3
) -> tuple[Tensor, Tensor]:
    """Read an insightface verification ``.bin`` file.

    Args:
        path: the ``.bin`` file.
        image_size: (height, width) to resize the images to; None keeps the stored size,
            which must then be the same for all images.
        channels: 1 for greyscale, 3 for RGB output.

    Returns:
        (images, issame): uint8 tensor of shape (2 * P, channels, H, W) and a bool tensor of
        shape (P,). Pair k is images 2k and 2k + 1.

    Raises:
        FileNotFoundError: if the file does not exist.
        pickle.UnpicklingError: if the file references any global outside the allowed set.
        ValueError: if the content does not have the layout above.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Verification file {path} not found; insightface's .bin files (lfw.bin, "
            "cfp_fp.bin, agedb_30.bin) come with its training datasets such as MS1MV2."
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
    with open(path, "rb") as handle:
        content = _RestrictedUnpickler(handle, encoding="bytes").load()
    if not isinstance(content, tuple | list) or len(content) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame) pair.")
    encoded, issame = content
    flags = _as_bool_list(issame, path)
    if not isinstance(encoded, list | tuple) or len(encoded) != 2 * len(flags):
        raise ValueError(
            f"{path}: expected {2 * len(flags)} images for {len(flags)} pairs, got "
            f"{len(encoded) if isinstance(encoded, list | tuple) else type(encoded).__name__}."
        )
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for index, data in enumerate(encoded):
        if not isinstance(data, bytes | bytearray):
            raise ValueError(f"{path}: image {index} is {type(data).__name__}, not bytes.")
        image = Image.open(io.BytesIO(data)).convert(mode)
        if image_size is not None:
            image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{path}: images have different sizes {sorted(shapes)}; set image_size.")
    logger.info("Read %d verification pairs from %s", len(flags), path)
    return torch.from_numpy(np.stack(arrays)), torch.tensor(flags, dtype=torch.bool)
