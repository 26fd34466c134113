"""Image decoding and checks shared by ingestion, validation and the torch dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def load_rgb(path: str | Path, resize_to: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode an image fully and return it in RGB; raises OSError/ValueError on any damage.

    resize_to(width, height) -> the size the caller will resize the image to: a JPEG at least twice that
    size both ways is then decoded at a reduced scale (libjpeg's DCT scaling, PIL's draft mode: 1/2, 1/4 or
    1/8, never below the target) and resized to exactly it, bilinear, which is several times cheaper for a
    large photo than a full decode followed by the resize."""
    with Image.open(path) as img:
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
        with Image.open(path) as img:
            img.load()
            return img.size
    except UnidentifiedImageError:
        return "not an image file (no decoder recognises it)"
    except (OSError, ValueError, SyntaxError) as exc:  # truncated, corrupt, bad header
        return f"cannot decode ({exc})"


def list_images(folder: str | Path) -> list[Path]:
    """All image files below a folder, sorted, by suffix (case-insensitive)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
