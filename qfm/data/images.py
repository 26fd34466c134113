"""Image decoding and checks shared by ingestion, validation and the torch dataset."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully and return it in RGB; raises OSError/ValueError on any damage."""
    with Image.open(path) as img:
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
