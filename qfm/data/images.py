"""Image decoding and checks shared by ingestion, validation, scoring and serving.

Every image is opened through `open_image`: only the formats the model is meant for (JPEG, PNG, BMP, TIFF,
WebP) are tried, so no other PIL plugin ever parses a file's bytes, and an image over the decompression-bomb
guard (PIL's `Image.MAX_IMAGE_PIXELS`, about 89 megapixels) is refused from its header, before decoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")  # PIL's names of the formats an image may have
ALLOWED_NAMES = "JPEG, PNG, BMP, TIFF or WebP"


class UnsupportedImage(UnidentifiedImageError):
    """A file that is not an image of an allowed format (an OSError, as PIL's own UnidentifiedImageError)."""


def decode_limit() -> int:
    """The largest image (width x height) decoded: PIL's decompression-bomb limit."""
    return int(Image.MAX_IMAGE_PIXELS or 0) or 89_478_485


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """Image.open, lazily (the header only), of an image in ALLOWED_FORMATS; raises UnsupportedImage naming
    the file and the allowed formats for any other file, and Image.DecompressionBombError for an image over
    decode_limit() pixels (PIL itself only warns below twice its limit)."""
    try:
        img = Image.open(path, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedImage(f"{path} is not an image of an accepted format ({ALLOWED_NAMES})") from None
    width, height = img.size
    if width * height > decode_limit():
        img.close()
        raise Image.DecompressionBombError(f"{path}: {width} x {height} = {width * height} pixels is over the "
                                           f"{decode_limit()}-pixel decoding limit (a decompression bomb?)")
    return img


def load_rgb(path: str | Path, resize_to: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode an image fully and return it in RGB; raises OSError/ValueError on any damage.

    resize_to(width, height) -> the size the caller will resize the image to: a JPEG at least twice that
    size both ways is then decoded at a reduced scale (libjpeg's DCT scaling, PIL's draft mode: 1/2, 1/4 or
    1/8, never below the target) and resized to exactly it, bilinear, which is several times cheaper for a
    large photo than a full decode followed by the resize."""
    with open_image(path) as img:
        if resize_to is not None and img.format == "JPEG":
            target = resize_to(*img.size)
            if img.size[0] >= 2 * target[0] and img.size[1] >= 2 * target[1]:
                img.draft("RGB", target)
                img.load()
                return img.convert("RGB").resize(target, Image.Resampling.BILINEAR)
        img.load()
        return img.convert("RGB")


def check_image(path: str | Path) -> tuple[int, int] | str:
    """Return (width, height) if the file decodes completely, else a short reason why not."""
    path = Path(path)
    if not path.exists():
        return "file does not exist"
    if not path.is_file():
        return "not a regular file"
    try:
        with open_image(path) as img:
            img.load()
            return img.size
    except UnidentifiedImageError:
        return f"not an image file of an accepted format ({ALLOWED_NAMES})"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated, corrupt, bad header
        return f"cannot decode ({exc})"


def list_images(folder: str | Path) -> list[Path]:
    """All image files below a folder, sorted, by suffix (case-insensitive)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
