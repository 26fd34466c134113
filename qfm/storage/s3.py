"""S3 through boto3: verified, resumable, parallel downloads of a prefix; verified uploads of a folder.

Settings: credentials, region and (unless passed) the endpoint come from boto3's standard chain: the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION,
AWS_ENDPOINT_URL), ~/.aws/config and ~/.aws/credentials, or the machine's role. ``endpoint_url`` points at an
S3-compatible store (MinIO, Ceph, moto).

Integrity: every upload stores the file's SHA-256 in the object's metadata (``x-amz-meta-sha256``) and is
checked afterwards (size and that digest). Every download is written to a temporary name next to its
destination, checked, then renamed into place; it is checked against, in this order of preference,
  * ``sha256`` — the object's ``x-amz-meta-sha256`` (objects qfm uploaded, whatever their size);
  * ``md5`` — a single-part ETag, which is the MD5 of the bytes (not for SSE-KMS / SSE-C objects);
  * ``multipart-md5`` — a multipart ETag, recomputed with the part size the store reports for part 1;
  * ``s3-checksum`` — a full-object CRC/SHA checksum the store returned, which botocore validates;
  * ``size`` — only the length, when the store gives nothing else (counted in the report, never hidden).
A file whose bytes fail the check is retried, then refused with a DataError.

Retries: botocore's ``standard`` mode retries throttling (SlowDown, 503) and transient errors (500, 502, 504,
connection errors) with exponential backoff and jitter; reads that break off mid-body (truncated, reset,
timed out) and checksum failures are retried here with the same kind of backoff.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import ProtocolError

from qfm.errors import DataError
from qfm.faults import pause_point
from qfm.storage.uri import S3Uri, parse_s3_uri

CHUNK = 1 << 20
META_SHA256 = "sha256"
TEMP_PATTERNS = (".*.part-*", ".*.tmp-*")   # our own temporary files: never uploaded, cleared before downloads
BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                   "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
ACCESS_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
TRANSIENT = {"InternalError", "SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException",
             "RequestTimeout", "500", "502", "503", "504"}
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")


def make_client(endpoint_url: str | None = None, *, max_attempts: int = 8, max_pool_connections: int = 16):
    """A boto3 S3 client: AWS settings from the standard chain; endpoint_url (or AWS_ENDPOINT_URL) for an
    S3-compatible store; botocore's standard retry mode with up to max_attempts tries per request."""
    config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                    max_pool_connections=max_pool_connections, connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


@dataclass
class TransferReport:
    """What a download or upload did: counts, bytes, time, how each file was verified, retries."""

    source: str
    files: int = 0
    transferred: int = 0
    skipped: int = 0                     # already identical at the destination (size and checksum)
    bytes: int = 0                       # bytes actually transferred
    seconds: float = 0.0
    retries: int = 0                     # broken reads / failed checks retried by qfm (botocore's not counted)
    verified_by: Counter = field(default_factory=Counter)
    excluded: list[str] = field(default_factory=list)   # local temporary files left out of an upload
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, transferred: bool, size: int, method: str, retries: int = 0) -> None:
        with self._lock:
            self.transferred += transferred
            self.skipped += not transferred
            self.bytes += size if transferred else 0
            self.verified_by[method] += 1
            self.retries += retries

    def summary(self) -> str:
        rate = f", {self.transferred / self.seconds:.1f} files/s, {self.bytes / 1e6 / self.seconds:.1f} MB/s" \
            if self.seconds > 0 and self.transferred else ""
        checks = ", ".join(f"{n} by {m}" for m, n in sorted(self.verified_by.items()))
        return (f"{self.source}: {self.files} files, {self.transferred} transferred ({self.bytes / 1e6:.1f} MB), "
                f"{self.skipped} already identical, in {self.seconds:.1f} s{rate}; verified: {checks or 'none'}"
                + (f"; {self.retries} retries" if self.retries else ""))


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says about one object."""

    key: str
    size: int
    etag: str
    sha256: str | None = None
    encrypted: bool = False           # SSE-KMS or SSE-C: the ETag is not an MD5 of the bytes
    full_checksum: bool = False       # the store returned a full-object checksum botocore validated


class _BadBytes(Exception):
    """A download whose bytes do not match what the store says (truncated or corrupted): retried."""


# Failures of a read already under way, which botocore does not retry: qfm retries the whole object.
RETRIED_READ_ERRORS = (ConnectionClosedError, FlexibleChecksumError, IncompleteReadError, ReadTimeoutError,
                       ResponseStreamingError, ProtocolError, ConnectionError, _BadBytes)


def storage_error(exc: Exception, uri: str, action: str, endpoint: str | None = None) -> DataError:
    """A DataError that names the bucket/key and says what to do, for a botocore exception."""
    where = f" at {endpoint}" if endpoint else ""
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return DataError(f"no usable AWS credentials for {uri} ({exc}): set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (an S3-compatible store needs its own keys), or run where a "
                         "machine or pod role provides them")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return DataError(f"cannot reach the S3 endpoint{where} while {action} {uri} ({exc}): check --endpoint-url / "
                         "storage.endpoint_url / AWS_ENDPOINT_URL and the network")
    if not isinstance(exc, ClientError):
        return DataError(f"S3 failure while {action} {uri}{where}: {type(exc).__name__}: {exc}")
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), error.get("Message", "")
    parsed = parse_s3_uri(uri)
    attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
    if code == "NoSuchBucket":
        return DataError(f"S3 bucket '{parsed.bucket}' does not exist{where} (while {action} {uri}): check the "
                         "bucket name, the endpoint (--endpoint-url / AWS_ENDPOINT_URL) and the region "
                         "(AWS_REGION); create the bucket before writing to it")
    if code in ("NoSuchKey", "404", "NotFound"):
        return DataError(f"{uri} does not exist{where} (while {action}): check the key (keys are case-sensitive); "
                         f"list what is there with `aws s3 ls {uri.rsplit('/', 1)[0]}/`")
    if code in BAD_CREDENTIALS:
        return DataError(f"S3 rejected the credentials{where} for {uri} ({code}: {message}): check "
                         "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) or AWS_PROFILE; "
                         "temporary credentials expire and must be renewed")
    if code in ACCESS_DENIED:
        need = "s3:PutObject and s3:ListBucket" if action.startswith("upload") else "s3:GetObject and s3:ListBucket"
        return DataError(f"access denied to {uri}{where} (while {action}): the credentials in use lack {need} on "
                         "it; use credentials that have them (AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                         "AWS_SECRET_ACCESS_KEY) or ask the bucket's owner for access")
    if code in TRANSIENT:
        return DataError(f"S3 kept failing for {uri}{where} ({code}: {message}) after {attempts} attempts with "
                         "backoff while " + action + ": the store is overloaded or down; try again later or raise "
                         "storage.max_attempts")
    return DataError(f"S3 error while {action} {uri}{where}: {code}: {message}")


def _endpoint(client) -> str:
    return client.meta.endpoint_url


def _backoff(attempt: int, base: float = 0.2, cap: float = 20.0) -> None:
    """Full-jitter exponential backoff before retry number `attempt` (0-based)."""
    time.sleep(random.random() * min(cap, base * 2 ** attempt))


def _call(client, uri: str, action: str, fn, **kwargs):
    """One client call with botocore's exceptions turned into a DataError naming the object."""
    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise storage_error(exc, uri, action, _endpoint(client)) from exc


def _head(client, bucket: str, key: str, action: str) -> ObjectInfo:
    """HEAD an object; a 404 or 403 (which come without a body) is resolved into the precise error."""
    uri = str(S3Uri(bucket, key))
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "403"):
            # HEAD errors have no body: ask with a GET of one byte, whose error names the cause.
            _call(client, uri, action, client.get_object, Bucket=bucket, Key=key, Range="bytes=0-0")
        raise storage_error(exc, uri, action, _endpoint(client)) from exc
    return _remote_from(key, head)


def head_object(uri: str, client=None, action: str = "checking") -> ObjectInfo:
    """Size, ETag and qfm's sha256 metadata of one object; a missing bucket/key or a refusal is a DataError."""
    client = client or make_client()
    target = parse_s3_uri(uri, what="S3 file", need_key=True)
    return _head(client, target.bucket, target.key, action)


def _remote_from(key: str, response: dict) -> ObjectInfo:
    checksum_type = response.get("ChecksumType", "FULL_OBJECT")
    has_checksum = any(k.startswith("Checksum") and k != "ChecksumType" for k in response)
    return ObjectInfo(key=key, size=int(response["ContentLength"]), etag=response.get("ETag", "").strip('"'),
                   sha256=(response.get("Metadata") or {}).get(META_SHA256),
                   encrypted=response.get("ServerSideEncryption", "").startswith("aws:kms")
                   or "SSECustomerAlgorithm" in response,
                   full_checksum=has_checksum and checksum_type != "COMPOSITE")


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def multipart_etag(path: Path, part_size: int) -> str:
    """The ETag S3 gives a multipart upload of this file in parts of part_size bytes: md5(md5s)-N."""
    digests = []
    with open(path, "rb") as handle:
        while part := handle.read(part_size):
            digests.append(hashlib.md5(part, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _checksum_kind(remote: ObjectInfo) -> str | None:
    """Which checksum can prove a local copy identical to this object (None: none can)."""
    if remote.sha256:
        return "sha256"
    if remote.encrypted:
        return None
    if _MD5_ETAG.match(remote.etag):
        return "md5"
    if _MULTIPART_ETAG.match(remote.etag):
        return "multipart-md5"
    return None


def _same(client, bucket: str, remote: ObjectInfo, path: Path, digests: tuple[str, str] | None = None) -> bool:
    """Whether the local file has the object's size and checksum (False when no checksum applies)."""
    kind = _checksum_kind(remote)
    if kind is None or path.stat().st_size != remote.size:
        return False
    sha, md5 = digests or file_digests(path)
    if kind == "sha256":
        return sha == remote.sha256
    if kind == "md5":
        return md5 == remote.etag
    part = client.head_object(Bucket=bucket, Key=remote.key, PartNumber=1)["ContentLength"]
    return multipart_etag(path, int(part)) == remote.etag


def _list(client, root: S3Uri, action: str) -> list[ObjectInfo]:
    """Every object under a folder URI (folder-marker keys ending in '/' are not files and are left out)."""
    paginator = client.get_paginator("list_objects_v2")
    found = []
    pages = paginator.paginate(Bucket=root.bucket, Prefix=root.folder_prefix)
    for page in _call(client, str(root), action, lambda: list(pages)):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                found.append(ObjectInfo(key=item["Key"], size=int(item["Size"]), etag=item.get("ETag", "").strip('"')))
    return found


def _relative(root: S3Uri, key: str) -> str:
    relative = key[len(root.folder_prefix):]
    parts = relative.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise DataError(f"object s3://{root.bucket}/{key} has an empty, '.' or '..' path segment and cannot be "
                        "written under a local folder; rename it in the bucket")
    return relative


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part-{os.getpid()}-{threading.get_ident()}")


def _clear_temps(folder: Path) -> None:
    """Remove temporary files that interrupted downloads left behind (not those of a download still running)."""
    for stale in folder.rglob(".*.part-*"):
        pid = stale.name.rsplit(".part-", 1)[1].split("-", 1)[0]
        if not (pid.isdigit() and _running(int(pid))):
            stale.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fetch(client, bucket: str, key: str, dest: Path, max_attempts: int) -> tuple[int, str, int]:
    """Download one object to dest (temp name, verify, rename); returns (bytes, verified-by, retries)."""
    uri = str(S3Uri(bucket, key))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    for attempt in range(max_attempts):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            remote = _remote_from(key, response)
            sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
            with open(tmp, "wb") as handle:
                for chunk in response["Body"].iter_chunks(CHUNK):
                    handle.write(chunk)
                    sha.update(chunk)
                    md5.update(chunk)
                    size += len(chunk)
            if size != remote.size:
                raise _BadBytes(f"{size} of {remote.size} bytes arrived (truncated)")
            method = _checksum_kind(remote) or ("s3-checksum" if remote.full_checksum else "size")
            if method in ("sha256", "md5", "multipart-md5") and not _same(
                    client, bucket, remote, tmp, (sha.hexdigest(), md5.hexdigest())):
                raise _BadBytes(f"the bytes do not match the object's {method} (corrupted in transit or at rest)")
            os.replace(tmp, dest)
            return size, method, attempt
        except RETRIED_READ_ERRORS as exc:
            tmp.unlink(missing_ok=True)
            if attempt + 1 >= max_attempts:
                raise DataError(f"download of {uri} failed {max_attempts} times ({type(exc).__name__}: {exc}); "
                                "nothing was written to " + str(dest) + ". The store or the network keeps breaking "
                                "the transfer: try again later or raise storage.max_attempts") from exc
            _backoff(attempt)
        except (ClientError, BotoCoreError) as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(exc, uri, "downloading", _endpoint(client)) from exc
    raise AssertionError("unreachable")


def _run_parallel(jobs: Sequence, work, workers: int, what: str, progress: bool) -> None:
    """Run work(job) for every job on a thread pool; every failure is collected and reported together."""
    from tqdm.auto import tqdm

    failures: list[str] = []
    first: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(work, job) for job in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc=what, unit="file", disable=not progress):
            exc = future.exception()
            if exc is not None:
                first = first or exc
                failures.append(str(exc))
    if failures:
        shown = "\n  - ".join(failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise DataError(f"{what}: {len(failures)} of {len(jobs)} files failed (the others are in place; run again "
                        f"to fetch only what is missing):\n  - {shown}{more}") from first


def download_prefix(uri: str, dest: str | Path, client=None, *, workers: int = 16, max_attempts: int = 5,
                    allow_empty: bool = False, progress: bool = False) -> TransferReport:
    """Mirror every object under the folder URI into dest, in parallel; files already identical (size and
    checksum) are skipped, so an interrupted download resumes where it stopped. Returns the report."""
    started = time.perf_counter()
    client = client or make_client()
    root = parse_s3_uri(uri, what="S3 folder")
    dest = Path(dest)
    remotes = _list(client, root, "listing")
    if not remotes and not allow_empty:
        raise DataError(f"nothing under {root}/ (no objects with prefix '{root.folder_prefix}' in bucket "
                        f"'{root.bucket}'): check the prefix (keys are case-sensitive)")
    targets = {r.key: dest / PurePosixPath(_relative(root, r.key)) for r in remotes}
    _check_no_file_folder_clash(targets.values())
    if dest.is_dir():
        _clear_temps(dest)
    report = TransferReport(source=str(root), files=len(remotes))

    def one(remote: ObjectInfo) -> None:
        path = targets[remote.key]
        if path.is_file() and path.stat().st_size == remote.size:
            # The listing's MD5 ETag settles it; otherwise (multipart, or an MD5 mismatch that may be SSE-KMS)
            # the object's sha256 metadata or its part size, from a HEAD, does.
            if _MD5_ETAG.match(remote.etag) and _same(client, root.bucket, remote, path):
                report.add(transferred=False, size=remote.size, method="md5")
                return
            full = _head(client, root.bucket, remote.key, "checking")
            if _same(client, root.bucket, full, path):
                report.add(transferred=False, size=remote.size, method=_checksum_kind(full))
                return
        size, method, retries = _fetch(client, root.bucket, remote.key, path, max_attempts)
        report.add(transferred=True, size=size, method=method, retries=retries)

    _run_parallel(remotes, one, workers, f"download {root}", progress)
    report.seconds = time.perf_counter() - started
    return report


def _check_no_file_folder_clash(paths: Iterable[Path]) -> None:
    paths = set(paths)
    for path in paths:
        for parent in path.parents:
            if parent in paths:
                raise DataError(f"the bucket holds both a file and a folder named {parent.name} ({parent} and "
                                f"{path}); a local folder cannot hold both: rename one of the objects")


def download_file(uri: str, dest: str | Path, client=None, *, max_attempts: int = 5) -> Path:
    """Download one object to dest (verified, via a temporary name); returns dest."""
    client = client or make_client()
    target = parse_s3_uri(uri, what="S3 file", need_key=True)
    dest = Path(dest)
    _fetch(client, target.bucket, target.key, dest, max_attempts)
    return dest


def _is_excluded(relative: str, patterns: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in patterns)


def upload_file(path: str | Path, uri: str, client=None, *, known: ObjectInfo | None = None,
                digests: tuple[str, str] | None = None) -> tuple[bool, str]:
    """Upload one file with its SHA-256 in the object's metadata, unless an identical object is already there
    (`known` is what a listing said about the key, if anything). Checked after the upload by a HEAD (size and
    SHA-256). Returns (transferred, how the result was verified)."""
    client = client or make_client()
    path = Path(path)
    target = parse_s3_uri(uri, what="S3 destination", need_key=True)
    sha, md5 = digests or file_digests(path)
    size = path.stat().st_size
    if known is not None and known.size == size:
        if _MD5_ETAG.match(known.etag) and known.etag == md5:
            return False, "md5"
        if _head(client, target.bucket, target.key, "uploading").sha256 == sha:
            return False, "sha256"
    _call(client, uri, "uploading", client.upload_file, Filename=str(path), Bucket=target.bucket, Key=target.key,
          ExtraArgs={"Metadata": {META_SHA256: sha}}, Config=TransferConfig(max_concurrency=4))
    after = _head(client, target.bucket, target.key, "checking the upload of")
    if after.size != size or after.sha256 != sha:
        raise DataError(f"upload of {path} to {uri} did not arrive intact (store reports {after.size} bytes, "
                        f"sha256 {after.sha256}; local {size} bytes, {sha}); run the upload again")
    return True, "sha256"


def upload_dir(local_dir: str | Path, uri: str, client=None, *, workers: int = 16, exclude: Sequence[str] = (),
               commit_last: Sequence[str] = (), progress: bool = False) -> TransferReport:
    """Upload every file of local_dir under the folder URI (unchanged files are skipped). Files named in
    commit_last (relative paths) go last, one at a time in that order, after everything else arrived: a reader
    who sees them sees a complete folder. Temporary files of interrupted writes are never uploaded."""
    started = time.perf_counter()
    client = client or make_client()
    root = parse_s3_uri(uri, what="S3 destination")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise DataError(f"cannot upload {local_dir}: it is not a folder")
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    report = TransferReport(source=f"{local_dir} -> {root}")
    report.excluded = [f for f in files if _is_excluded(f, (*TEMP_PATTERNS, *exclude))]
    files = [f for f in files if f not in report.excluded]
    if not files:
        raise DataError(f"nothing to upload: {local_dir} holds no files")
    report.files = len(files)
    listed = {r.key: r for r in _list(client, root, "listing the destination of an upload to")}

    def one(relative: str) -> None:
        key = root.join(relative)
        transferred, method = upload_file(local_dir / relative, str(key), client, known=listed.get(key.key))
        report.add(transferred=transferred, size=(local_dir / relative).stat().st_size, method=method)

    last = [f for f in commit_last if f in files]
    _run_parallel([f for f in files if f not in last], one, workers, f"upload to {root}", progress)
    for relative in last:
        one(relative)
        pause_point(f"upload:{relative}")
    report.seconds = time.perf_counter() - started
    return report


def check_bucket(uri: str, client=None, action: str = "writing to") -> None:
    """Fail early (before a long step runs) when the bucket is missing or the credentials cannot list it."""
    client = client or make_client()
    root = parse_s3_uri(uri, what="S3 folder")
    _call(client, str(root), action, client.list_objects_v2, Bucket=root.bucket, Prefix=root.folder_prefix,
          MaxKeys=1)
