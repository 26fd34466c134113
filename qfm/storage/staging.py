"""A step's s3:// folders, mirrored in the local cache (CACHE/bucket/key): input folders are fetched before
the step runs; an output folder is written locally and uploaded after it (and after every training epoch),
so a step on a preemptible machine resumes from S3 on another one.

S3 is the reference: on --resume the local mirror is brought to the S3 copy (an unfinished local epoch is
redone, with the same result). A run folder's commit files (``last.safetensors`` then its sidecar) are uploaded last,
so the S3 copy never holds a ``last.safetensors`` newer than its ``best.safetensors`` and history.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from qfm.errors import ConfigError
from qfm.storage.s3 import (
    TransferReport,
    check_bucket,
    download_prefix,
    file_digests,
    head_object,
    make_client,
    upload_dir,
)
from qfm.storage.uri import cache_path, parse_s3_uri

COMMIT_LAST = ("last.safetensors", "last.safetensors.sha256")
SIDECAR = ".sha256"


@dataclass(frozen=True)
class Storage:
    """Where and how to transfer: endpoint (None: the standard AWS settings), cache folder, parallelism."""

    endpoint_url: str | None = None
    cache: Path = Path(".qfm-cache")
    workers: int = 16
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_attempts < 1:
            raise ConfigError(f"storage.workers and storage.max_attempts must be >= 1, got {self.workers} and "
                              f"{self.max_attempts}")

    def client(self):
        return make_client(self.endpoint_url, max_attempts=self.max_attempts, max_pool_connections=self.workers)


def fetch_folder(uri: str, storage: Storage, *, what: str = "S3 folder", allow_empty: bool = False,
                 progress: bool = False, client=None) -> tuple[Path, TransferReport]:
    """Mirror an S3 folder into the cache (only what differs is downloaded); returns (local folder, report)."""
    client = client or storage.client()
    local = cache_path(parse_s3_uri(uri, what=what), storage.cache)
    report = download_prefix(uri, local, client, workers=storage.workers, max_attempts=storage.max_attempts,
                             allow_empty=allow_empty, progress=progress)
    local.mkdir(parents=True, exist_ok=True)
    reconcile_sidecars(local, uri, client)
    return local, report


def reconcile_sidecars(local_dir: Path, uri: str, client) -> list[Path]:
    """Rewrite a checksum sidecar (X.sha256) that disagrees with its file X when X's object carries that very
    sha256 in its metadata: X arrived complete and verified, and the sidecar object is the previous one (an
    upload cut off between the two). Any other disagreement is left for the checkpoint loader to refuse."""
    root = parse_s3_uri(uri, what="S3 folder")
    fixed = []
    for sidecar in sorted(local_dir.rglob(f"*{SIDECAR}")):
        data = sidecar.with_name(sidecar.name[: -len(SIDECAR)])
        if not data.is_file():
            continue
        digest = file_digests(data)[0]
        if sidecar.read_text().strip() == digest:
            continue
        remote = head_object(str(root.join(data.relative_to(local_dir).as_posix())), client)
        if remote.sha256 == digest:
            tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
            tmp.write_text(digest + "\n")
            os.replace(tmp, sidecar)
            fixed.append(sidecar)
    return fixed


class StagedOutput:
    """An s3:// output folder: the step writes into its cache mirror; push() uploads what changed."""

    def __init__(self, uri: str, storage: Storage, *, resume: bool = False, progress: bool = False) -> None:
        self.uri, self.storage, self.progress = uri, storage, progress
        self.client = storage.client()
        self.local = cache_path(parse_s3_uri(uri, what="--out"), storage.cache)
        self.fetched: TransferReport | None = None
        if resume:  # continue from the S3 copy (checkpoints included), whatever this machine holds
            self.local, self.fetched = fetch_folder(uri, storage, what="--out", allow_empty=True, progress=progress,
                                                    client=self.client)
        else:  # fail before a long step when the bucket is missing or unreadable; start from an empty folder
            check_bucket(uri, self.client)
            if self.local.exists():
                shutil.rmtree(self.local)
        self.local.mkdir(parents=True, exist_ok=True)

    def push(self, _record: dict | None = None) -> TransferReport:
        """Upload the folder (unchanged files skipped, last.safetensors and its sidecar last). Usable as on_epoch."""
        return upload_dir(self.local, self.uri, self.client, workers=self.storage.workers, commit_last=COMMIT_LAST,
                          progress=self.progress)
