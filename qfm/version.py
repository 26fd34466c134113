"""Which code this is: the package version and the git commit, and the image tag keyed on that commit.

Inside the project image the commit is the one baked in at build time (the Dockerfile's GIT_COMMIT build
argument, as the environment variable QFM_GIT_COMMIT); outside it, the commit of the git checkout the
package is imported from, if it is one. A checkout whose files differ from its commit is marked "-dirty".
"""

import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

COMMIT_ENV = "QFM_GIT_COMMIT"
_COMMIT_RE = re.compile(r"^[0-9a-f]{7,40}(-dirty)?$")
# A tag that already names a commit (…-<12 hex>[-dirty]) or an image pinned by digest.
_KEYED_RE = re.compile(r"(-[0-9a-f]{12}(-dirty)?$)|(@sha256:[0-9a-f]{64}$)")


def package_version() -> str:
    """qfm's version: the installed distribution's, else pyproject.toml's next to the package."""
    try:
        return metadata.version("qfm")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE) if pyproject.is_file() else None
        return match.group(1) if match else "unknown"


def git_commit(root: str | Path | None = None) -> str | None:
    """The commit of this code: $QFM_GIT_COMMIT (set in the image), else `git rev-parse HEAD` of the checkout
    holding the package (with "-dirty" when tracked files differ from it); None when neither is known."""
    baked = os.environ.get(COMMIT_ENV, "").strip()
    if baked and baked != "unknown":
        return baked
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if status else head


def version_string() -> str:
    """What `qfm --version` prints: 'qfm 0.1.0 (commit abc…)' or 'qfm 0.1.0 (commit unknown)'."""
    return f"qfm {package_version()} (commit {git_commit() or 'unknown'})"


def commit_image(image: str, commit: str) -> str:
    """`image` keyed on `commit`: REG/qfm:0.1.0-cuda -> REG/qfm:0.1.0-cuda-<first 12 hex of commit>.

    The tag scripts/build_image.sh gives the image it builds at that commit, so a step's image (and with it
    KFP's cache key, which includes the image parameter) changes whenever the code does. An image that
    already names a commit, or is pinned by digest (@sha256:…), is returned unchanged."""
    commit = commit.strip().lower()
    if not _COMMIT_RE.match(commit):
        raise ValueError(f"commit '{commit}' is not a git commit hash (7 to 40 hex digits, optionally -dirty)")
    if _KEYED_RE.search(image):
        return image
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # no tag: the commit is the tag
        name, tag = image, "latest"
    suffix = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{name}:{tag}-{suffix}"


def keyed_image(image: str, commit: str | None = None) -> str:
    """`image` keyed on `commit` (default: this code's, git_commit()) as commit_image does; ConfigError when
    no commit is known and the image names none (pin it by digest then: IMAGE@sha256:...)."""
    from qfm.errors import ConfigError

    image = image.strip()
    if not image:
        raise ConfigError("the image is empty: give the project image, e.g. registry.example.com/qfm:0.1.0-cuda")
    if _KEYED_RE.search(image):
        return image
    commit = commit or git_commit()
    if commit is None:
        raise ConfigError(f"image '{image}': the code's commit is unknown (not a git checkout, no {COMMIT_ENV}), so "
                          "the image cannot be keyed on it; give the commit tag scripts/build_image.sh printed "
                          "(…-<12 hex>) or pin the image by digest (IMAGE@sha256:…)")
    try:
        return commit_image(image, commit)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({COMMIT_ENV} or the checkout)") from exc
