"""The project's exceptions: everything hooked_vit and analyses raise on purpose derives from
:class:`HookedViTError`.

The ``hooked-vit`` CLI prints a ``HookedViTError`` as one line (``hooked-vit CMD: error: <message>``)
and exits 2; ``--debug`` shows the traceback. Any other exception is a bug and keeps its traceback.

Messages are one sentence or two: what was wrong (the option or file, and the value), and what would
be right. Subclasses also derive from the builtin the caller would expect (``ValueError`` for a bad
argument, ``FileNotFoundError`` for a missing file), so ``except ValueError`` keeps working.

Raise them directly::

    from hooked_vit.errors import InvalidArgumentError, check
    check(epochs >= 0, f"epochs must be >= 0; got {epochs}")          # InvalidArgumentError
    raise CorruptFileError(path, "a safetensors file", "delete it and rerun")

This module imports only the standard library (the CLI imports it before anything heavy).
"""

from __future__ import annotations

import os


class HookedViTError(Exception):
    """Base class of every error hooked_vit and analyses raise on purpose (the CLI prints one line)."""


class InvalidArgumentError(HookedViTError, ValueError):
    """An argument (function parameter or CLI option) has a value outside what is valid; the message
    names it, the value, and what is valid."""


class InvalidTypeError(HookedViTError, TypeError):
    """An argument has the wrong type (e.g. a list where a tensor is needed, int images)."""


class UnknownNameError(HookedViTError, KeyError):
    """A name (hook, site, class, dataset, ...) is not among the known ones; the message lists the
    closest known names. Unlike ``KeyError``, ``str()`` is the plain message (no quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingFileError(HookedViTError, FileNotFoundError):
    """A file or directory the user named (or that a step needs) does not exist."""


class CorruptFileError(HookedViTError, ValueError):
    """A file exists but is not what was expected (empty, truncated, wrong format, wrong content).

    ``CorruptFileError(path, expected, fix)`` builds the message: the path, what was expected, what
    was found (``found``, optional) and how to fix it (e.g. how to rebuild a cache entry).
    """

    def __init__(self, path: str | os.PathLike, expected: str, fix: str = "", *, found: str = "") -> None:
        self.path = os.fspath(path)
        message = f"{self.path} is not {expected}"
        if found:
            message += f" ({found})"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class CacheLockTimeoutError(HookedViTError, TimeoutError):
    """Waited too long for another process building the same cache entry; the message names the lock file."""


class UnsupportedModelError(HookedViTError, ValueError):
    """The timm model uses a feature HookedViT does not implement."""


class CheckpointMismatchError(HookedViTError, RuntimeError):
    """A checkpoint's keys or shapes do not fit the architecture."""


class OfflineWeightsError(HookedViTError, RuntimeError):
    """Pretrained weights were asked for, but the hub cannot be reached and nothing is cached."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`InvalidArgumentError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvalidArgumentError(message)


def short_exception(error: BaseException) -> str:
    """``error`` as one line: ``TypeName: first line of its message`` (for wrapping a low-level error)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
