"""s3://bucket/key URIs: parsing, joining, and where an S3 folder is mirrored in the local cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from qfm.errors import ConfigError

SCHEME = "s3://"


def is_s3_uri(text: object) -> bool:
    """Whether text is an s3:// URI (a str starting with s3://)."""
    return isinstance(text, str) and text.startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key (a file) or a key prefix (a folder; no trailing slash kept)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    @property
    def folder_prefix(self) -> str:
        """The key prefix of everything under this URI seen as a folder ('' for the whole bucket)."""
        return f"{self.key}/" if self.key else ""

    def join(self, relative: str) -> S3Uri:
        """The URI of a file under this folder (relative uses '/' separators)."""
        return S3Uri(self.bucket, f"{self.folder_prefix}{relative}")


def parse_s3_uri(uri: str, *, what: str = "URI", need_key: bool = False) -> S3Uri:
    """Split s3://bucket/key; a malformed URI raises ConfigError naming `what` (e.g. '--root')."""
    parsed = urlparse(uri)
    key = parsed.path.strip("/")
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ConfigError(f"{what} '{uri}' is not of the form s3://bucket/key")
    if need_key and not key:
        raise ConfigError(f"{what} '{uri}' names a bucket but no key; use s3://bucket/path/to/file")
    if any(part in ("", ".", "..") for part in key.split("/")) and key:
        raise ConfigError(f"{what} '{uri}' has an empty, '.' or '..' path segment; write the key plainly")
    return S3Uri(parsed.netloc, key)


def cache_path(uri: S3Uri, cache_dir: str | Path) -> Path:
    """Where an S3 folder or file is mirrored locally: CACHE/bucket/key (the bucket's layout kept, so the
    relative paths between mirrored folders stay as they are in the bucket)."""
    return Path(cache_dir) / uri.bucket / PurePosixPath(uri.key)
