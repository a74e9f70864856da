"""Which keys are images: the suffixes every side uses by default (``BOTTLENECK_SUFFIXES``).

One list for the producer's filter, the tools' listings and the demo; the stack's EventBridge
rule and its ``BOTTLENECK_SUFFIXES`` are checked against it by the template tests.
"""

from __future__ import annotations

__all__ = ["IMAGE_SUFFIXES"]

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    # Phone photos: HEIC/HEIF (the iPhone's default) and AVIF.
    ".heic",
    ".heif",
    ".avif",
)
