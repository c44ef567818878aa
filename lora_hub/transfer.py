"""Resumable downloads into the Hugging Face cache, for the adapter weights that `pull` fetches.

huggingface_hub 2.x downloads each file to a process-unique temporary name and deletes it on failure: a pull that is
killed outright leaves a `<etag>.<random>.incomplete` file that nothing ever reuses or removes, and the next pull
starts from zero. Here a large (LFS) file is downloaded to one stable name in the cache, `blobs/<sha256>.partial`,
under the same lock huggingface_hub takes for that blob: a later pull continues it with a range request, checks the
whole file against its sha256 (the name it is cached under), and moves it into place, where the client then finds
it. Under that lock nothing else downloads the blob, so the incomplete files that killed client downloads left for
it are removed.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HubUnreachableError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

PARTIAL_SUFFIX = ".partial"
CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


def prefetch(api: HfApi, repo_id: str, filename: str, *, revision: str | None,
             cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """Downloads `filename` of the repository into the cache's blobs, resuming what an earlier, interrupted pull left
    (see the module docs). Does nothing offline, for files that are not LFS objects, or when the blob is cached.

    Returns:
        The blob, when it is an LFS object (now complete); else None.

    Raises:
        huggingface_hub's errors (the file or repository is missing, access is denied); HubUnreachableError when the
        transfer breaks off (what arrived is kept for the next pull) or the result fails its sha256.
    """
    from filelock import FileLock
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name

    if constants.HF_HUB_OFFLINE:
        return None
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=api.endpoint)
    metadata = get_hf_file_metadata(url, token=api.token, endpoint=api.endpoint)
    sha256 = (metadata.etag or "").removeprefix("W/").strip('"')
    if not _SHA256.fullmatch(sha256) or metadata.size is None:
        return None  # a regular (small) file: its cache key is a git hash, and the client fetches it whole
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = cache / folder / "blobs" / sha256
    lock = cache / ".locks" / folder / f"{sha256}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        for stale in blob.parent.glob(f"{sha256}.*.incomplete"):  # left by client downloads that were killed
            stale.unlink(missing_ok=True)
        if blob.exists():
            return blob
        partial = blob.with_name(sha256 + PARTIAL_SUFFIX)
        _download(url, api.token, partial, metadata.size, sha256)
        _chmod_like_cache(partial)
        os.replace(partial, blob)
    return blob


def sweep(repo_id: str, *, cache_dir: str | os.PathLike[str] | None) -> None:
    """Removes the `.incomplete` files that killed client downloads left in the repository's cache folder, each
    under its blob's lock (taken without waiting: a file whose download is running is left alone)."""
    from filelock import FileLock, Timeout
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    for stale in (cache / folder / "blobs").glob("*.incomplete"):
        lock = cache / ".locks" / folder / f"{stale.name.split('.', 1)[0]}.lock"
        try:
            with FileLock(lock, timeout=0):
                stale.unlink(missing_ok=True)
        except (Timeout, OSError):
            continue


def _download(url: str, token: str | bool | None, partial: Path, size: int, sha256: str) -> None:
    """Completes `partial` from `url` with a range request, then checks its sha256; a file that fails it is removed
    (so the next pull starts afresh) and reported. Redirects are followed; the token is not sent to another host."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    digest = hashlib.sha256()
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    with partial.open("ab") as out:
        with partial.open("rb") as existing:  # the bytes kept from before count towards the hash
            while chunk := existing.read(CHUNK_BYTES):
                digest.update(chunk)
        if have < size:
            headers = build_hf_headers(token=token)
            headers["Range"] = f"bytes={have}-"
            headers["Accept-Encoding"] = "identity"
            with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                response.raise_for_status()
                if response.status_code == 200 and have:  # the server ignored the range: start over
                    out.truncate(0)
                    out.seek(0)
                    digest, have = hashlib.sha256(), 0
                for chunk in response.iter_bytes():  # as it arrives: what came before a break is kept
                    out.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
                    if have > size:
                        break
            out.flush()
            os.fsync(out.fileno())
    if have != size or digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise HubUnreachableError(f"the download of {url} gave {have:,} bytes with sha256 {digest.hexdigest()}, "
                                  f"expected {size:,} bytes with sha256 {sha256}: it was discarded; pull again")


def _chmod_like_cache(path: Path) -> None:
    """The permissions the cache folder gives new files, as huggingface_hub sets them on its blobs."""
    probe = path.with_name(f"{path.name}.mode")
    try:
        probe.touch()
        os.chmod(path, probe.stat().st_mode & 0o777)
    except OSError:
        pass
    finally:
        probe.unlink(missing_ok=True)
