"""Data-directory resolution and checksummed downloads into that directory."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "ZOO_DATA_DIR"
DEFAULT_DATA_DIR = Path.home() / ".cache" / "zoo" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data directory: the argument, else ``$ZOO_DATA_DIR``, else ``~/.cache/zoo/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_DATA_DIR


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_with_checksum(
    url: str, dest: str | os.PathLike, sha256: str | None, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` unless a file with the expected SHA-256 is already there.

    The file is written to a temporary name first and moved into place only after its
    checksum matches, so an interrupted or corrupted download never leaves a file that
    looks complete.

    Raises:
        RuntimeError: if the download fails or the checksum does not match.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        actual = sha256_of(tmp_name)
        if sha256 is not None and actual != sha256:
            raise RuntimeError(
                f"Checksum mismatch for {url}: expected sha256 {sha256}, got {actual}. "
                "The mirror may serve a different file; delete it and retry, or place the "
                f"correct file at {dest} by hand."
            )
        os.replace(tmp_name, dest)
    except OSError as error:
        raise RuntimeError(
            f"Download of {url} failed: {error}. Check the network, or place the file at "
            f"{dest} by hand (or set ${DATA_DIR_ENV} to a folder that already holds it)."
        ) from error
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return dest
