"""On-disk cache of pruned (and fine-tuned) models, so a repeated
``HookedViT.from_pretrained(name, sparsity=...)`` loads instead of recomputing.

Location: ``$HOOKED_VIT_CACHE`` if set, else ``$XDG_CACHE_HOME/hooked_vit``, else
``~/.cache/hooked_vit``; entries live in ``<root>/pruned/<model>-<method>-<sparsity>-<key>/`` as
:meth:`~hooked_vit.HookedViT.save_pretrained` directories plus ``cache_key.json``. The key hashes
the dense weights, the dtype, the pruning method, sparsity and N:M pattern, the calibration identity
(content hash of the calibration images, with their source, count and seed) and the fine-tuning
settings.

Sharing: processes (or ranks on a shared filesystem) asking for the same entry at once take the file
lock ``<root>/locks/<entry>.lock``: one builds, the others wait (up to ``$HOOKED_VIT_LOCK_TIMEOUT`` seconds,
default 3600) and then load. An entry appears by renaming a complete directory into place, so a
reader never sees a partial one. A corrupt entry is moved aside (``<entry>.corrupt-<id>``) with a
warning and rebuilt. A cache that cannot be written (read-only, full disk) gives a warning and the
model is built without caching.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hooked_vit import atomic
from hooked_vit.errors import CacheLockTimeoutError, HookedViTError

KEY_FILE = "cache_key.json"
LOCK_TIMEOUT_SECONDS = 3600.0


def cache_root() -> Path:
    """The hooked_vit cache directory (see module docstring); not created here."""
    if os.environ.get("HOOKED_VIT_CACHE"):
        return Path(os.environ["HOOKED_VIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hooked_vit"
    return Path.home() / ".cache" / "hooked_vit"


@torch.no_grad()
def state_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of a model's state dict: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{list(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cache_key(payload: dict[str, Any]) -> str:
    """Hex SHA-256 of ``payload`` as canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def entry_dir(model_name: str, method: str, sparsity: float, nm: tuple[int, int] | None, key: str) -> Path:
    """Cache directory of one pruned model (readable name + the first 16 hex digits of its key)."""
    pattern = f"{nm[0]}of{nm[1]}" if nm else f"s{sparsity:g}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return cache_root() / "pruned" / f"{safe}-{method}-{pattern}-{key[:16]}"


def is_cached(directory: Path, key: str) -> bool:
    """Whether ``directory`` holds a complete entry written for ``key`` (an unreadable key file
    counts as absent)."""
    try:
        return json.loads((directory / KEY_FILE).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def store(model: nn.Module, directory: Path, key: str, payload: dict[str, Any]) -> Path:
    """Save ``model`` into ``directory`` atomically (written aside, then renamed into place,
    replacing an old entry). Call it holding :func:`acquire_lock`."""
    with atomic.atomic_directory(directory, replace=True) as tmp:
        model.save_pretrained(tmp)
        atomic.write_json(tmp / KEY_FILE, json.loads(json.dumps({"key": key, "payload": payload}, default=str)))
    return directory


def lock_timeout() -> float:
    """Seconds to wait for another process building the same entry (``$HOOKED_VIT_LOCK_TIMEOUT``)."""
    return float(os.environ.get("HOOKED_VIT_LOCK_TIMEOUT", LOCK_TIMEOUT_SECONDS))


def lock_path(directory: Path) -> Path:
    """The lock file of cache entry ``<root>/pruned/<entry>``: ``<root>/locks/<entry>.lock``."""
    return directory.parent.parent / "locks" / f"{directory.name}.lock"


def take_lock(path: Path, doing: str, timeout: float | None = None) -> Any:
    """Take the file lock ``path`` (created with its parents) and return it (``.release()`` it);
    :class:`~hooked_vit.errors.CacheLockTimeoutError` naming the lock file and what its holder is
    ``doing`` after ``timeout`` seconds (default :func:`lock_timeout`), ``OSError`` if the folder
    cannot be written."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = lock_timeout() if timeout is None else timeout
    lock = FileLock(str(path), timeout=timeout, mode=0o666)
    try:
        lock.acquire()
    except Timeout:
        raise CacheLockTimeoutError(
            f"waited {timeout:g} s for the cache lock {path}: another process is {doing}. "
            "Wait for it, or raise $HOOKED_VIT_LOCK_TIMEOUT; the lock is freed when that process exits"
        ) from None
    return lock


def acquire_lock(directory: Path, timeout: float | None = None) -> Any:
    """Take the file lock of cache entry ``directory`` (:func:`lock_path`, see :func:`take_lock`)."""
    return take_lock(lock_path(directory), f"building {directory.name}", timeout)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def cached_or_built(directory: Path, key: str, payload: dict[str, Any], build: Callable[[bool], nn.Module],
                    load: Callable[[Path], nn.Module]) -> nn.Module:
    """``load(directory)`` if it holds the entry for ``key``, else ``build(caching)``, stored there
    (``caching`` says whether the cache is writable, e.g. for checkpoints beside the entry).

    Concurrent callers for one entry: one builds under :func:`acquire_lock`, the others wait and load.
    A corrupt entry (``load`` raises a hooked_vit error) is moved aside with a warning and rebuilt.
    If the cache cannot be written, ``build(False)`` runs with a warning and nothing is stored."""
    if is_cached(directory, key):
        try:
            return load(directory)
        except HookedViTError:
            pass  # corrupt: handled under the lock below
    try:
        lock = acquire_lock(directory)
    except OSError as error:
        _warn(f"cannot write the pruned-model cache at {directory.parent} ({error.strerror or error}); building "
              "without caching. Set $HOOKED_VIT_CACHE to a writable folder to cache pruned models")
        return build(False)
    try:
        if is_cached(directory, key):
            try:
                return load(directory)
            except HookedViTError as error:
                aside = atomic.move_aside(directory, "corrupt")
                _warn(f"cached model {directory} is corrupt ({error}); moved it to {aside} and rebuilding")
        elif directory.exists():
            aside = atomic.move_aside(directory, "incomplete")
            _warn(f"cache entry {directory} was incomplete or for another key; moved it to {aside} and rebuilding")
        for stale in directory.parent.glob(f".{directory.name}.*{atomic.TMP_SUFFIX}"):  # of killed builders
            shutil.rmtree(stale, ignore_errors=True)
        model = build(True)
        try:
            store(model, directory, key, payload)
        except OSError as error:
            _warn(f"could not store the pruned model in the cache {directory} ({error}); continuing without caching")
        return model
    finally:
        lock.release()
