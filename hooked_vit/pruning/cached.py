"""On-disk cache of pruned (and fine-tuned) models, so a repeated
``HookedViT.from_pretrained(name, sparsity=...)`` loads instead of recomputing.

Location: ``$HOOKED_VIT_CACHE`` if set, else ``$XDG_CACHE_HOME/hooked_vit``, else
``~/.cache/hooked_vit``; entries live in ``<root>/pruned/<model>-<method>-<sparsity>-<key>/`` as
:meth:`~hooked_vit.HookedViT.save_pretrained` directories plus ``cache_key.json``. The key hashes
the dense weights, the dtype, the pruning method, sparsity and N:M pattern, the calibration identity
(content hash of the calibration images, with their source, count and seed) and the fine-tuning
settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

KEY_FILE = "cache_key.json"


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
    """Whether ``directory`` holds a complete entry written for ``key``."""
    key_file = directory / KEY_FILE
    return key_file.is_file() and json.loads(key_file.read_text()).get("key") == key


def store(model: nn.Module, directory: Path, key: str, payload: dict[str, Any]) -> Path:
    """Save ``model`` into ``directory`` atomically (written aside, then renamed into place)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / KEY_FILE).write_text(json.dumps({"key": key, "payload": payload}, indent=2, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
