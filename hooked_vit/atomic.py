"""Write every file whole or not at all.

Each writer writes into a temporary file in the target's directory (``.<name>.<random>.tmp``), flushes
it to disk and renames it over the target with ``os.replace``, which is atomic on POSIX: a reader (or a
rerun after a kill, a full disk or a crash) sees the old file or the new one, never a partial one. On
an error the temporary file is removed and the target is untouched. Files are created with mode
``0o666`` minus the umask (like ``open``), not ``0o600`` like ``tempfile.mkstemp``.

Use the helper for the format, or :func:`atomic_path` / :func:`open_atomic` for any other writer::

    from hooked_vit import atomic
    atomic.write_json(out / "result.json", data)
    atomic.save_safetensors({"w": w}, out / "model.safetensors", metadata={"k": "v"})
    atomic.torch_save(state, out / "checkpoint.pt")
    atomic.save_figure(fig, out / "figure.png", dpi=150)
    with atomic.open_atomic(out / "table.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with atomic.atomic_path(out / "weights.bin") as tmp:   # a writer that wants a path
        some_library.save(obj, tmp)
    with atomic.atomic_directory(cache / "entry") as tmp:  # a whole directory, renamed into place
        model.save_pretrained(tmp)
    with atomic.files_into(out) as tmp:                     # a library writing several files into out/
        sae.save_inference_model(tmp)

Temporary names end in ``.tmp``, so globs for ``*.json`` or ``*.safetensors`` never match a leftover
of a killed process; they name their writer (``pid@host``), so :func:`remove_stale_temporaries` can
clear a dead writer's leftovers when a job resumes (``hooked-vit impact`` does). This module imports
only the standard library; torch, safetensors and matplotlib are imported by the helper that needs
them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from hooked_vit.errors import InvalidArgumentError

TMP_SUFFIX = ".tmp"
TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<random>[0-9a-f]{12})\.(?P<pid>\d+)@(?P<host>[^/@]+)"
                         + re.escape(TMP_SUFFIX) + "$")


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary path beside ``path``, naming its writer:
    ``<dir>/.<name>.<random>.<pid>@<host>.tmp``."""
    path = Path(path)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.{os.getpid()}@{socket.gethostname()}{TMP_SUFFIX}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove the temporaries under ``root`` (recursively) left by writers that died before renaming
    them (a kill, a crash): those written on this host by a process that no longer runs. Live
    writers' files, other hosts' and unnamed ones are kept. Returns what was removed."""
    root, host, removed = Path(root), socket.gethostname(), []
    if not root.is_dir():
        return removed
    for tmp in sorted(root.rglob(f".*{TMP_SUFFIX}"), key=lambda p: len(p.parts)):  # outermost first
        match = TMP_PATTERN.match(tmp.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        if any(parent in tmp.parents for parent in removed):  # went with a removed directory
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (an empty file, mode 0o666 minus umask) beside ``path``; when the block
    ends without an exception, flush it to disk and rename it over ``path``. Parent directories are
    created. On an exception the temporary file is removed and ``path`` is unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) recreate the file as 0o600
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` written atomically (``mode`` is ``"w"`` or ``"wb"``)."""
    if mode not in ("w", "wb", "wt"):
        raise InvalidArgumentError(f"open_atomic writes whole files: mode must be 'w' or 'wb'; got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with open_atomic(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with open_atomic(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, **dump_kwargs: Any) -> Path:
    """Write ``data`` as JSON (``json.dump`` keyword arguments pass through) atomically."""
    with open_atomic(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent, **dump_kwargs)
        handle.write("\n")
    return Path(path)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *,
              columns: Sequence[str] | None = None, comments: Sequence[str] = ()) -> Path:
    """Write dict ``rows`` as CSV atomically, preceded by ``# comment`` lines; ``columns`` default to
    the keys of the rows in first-seen order."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with open_atomic(path, "w", newline="", encoding="utf-8") as handle:
        for line in comments:
            for part in str(line).splitlines():
                handle.write(f"# {part}\n")
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file(tensors, path, metadata)`` atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (load it back with ``torch.load(path, weights_only=True)``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_figure(figure: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """``figure.savefig(path, **savefig_kwargs)`` atomically; the format comes from ``path``'s suffix
    unless ``format=`` is given."""
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, **savefig_kwargs)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; when the block ends without an exception,
    rename it to ``path``. The caller must hold a lock if other processes may write ``path`` too
    (:mod:`hooked_vit.pruning.cached` does).

    If ``path`` exists: with ``replace=True`` it is first moved aside (``<path>.old-<random>``)
    and removed after the rename; otherwise ``FileExistsError``. Readers of ``path`` see the old
    complete directory or the new one (or, for an instant during a replacement, none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync(child)
        old = None
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists; pass replace=True to replace it")
            old = move_aside(path, "old")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def files_into(directory: str | os.PathLike) -> Iterator[Path]:
    """For a library that writes several files into a folder in place (e.g. sae-lens's
    ``save_inference_model``): yield an empty temporary folder inside ``directory``; when the block
    ends without an exception, each file written there is flushed and renamed into ``directory``
    (each file whole; files are replaced one after the other). The temporary folder is removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(directory / "files")
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        for child in sorted(tmp.iterdir()):
            if child.is_file():
                _fsync(child)
                os.replace(child, directory / child.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_aside(path: str | os.PathLike, reason: str = "corrupt") -> Path:
    """Rename file or directory ``path`` to ``<path>.<reason>-<random>`` in the same directory (kept
    for inspection, out of the way of a rebuild); returns the new path."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.{reason}-{uuid.uuid4().hex[:8]}")
    os.replace(path, aside)
    return aside
