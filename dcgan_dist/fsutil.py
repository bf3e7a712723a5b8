"""Files: atomic writes (a reader sees the old file or the whole new one, never half of one), digests, and
the safetensors files of this project, which name their format in their metadata."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def probe_writable(path: Path) -> None:
    """Create `path` if needed and prove a file can be written in it; raises OSError if not.

    The probe file is unique per process: every rank runs this at start, and a shared name would let
    one rank delete another's probe mid-check.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
    os.close(fd)
    os.unlink(probe)


def safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def load_safetensors(path: Path, fmt: str, what: str) -> tuple[dict[str, str], dict]:
    """(metadata, tensors) of a safetensors file whose metadata names format `fmt`; a one-line UserError
    naming the file otherwise. safetensors holds data only: nothing in it runs."""
    from safetensors import safe_open

    from dcgan_dist.errors import UserError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if meta.get("format") == fmt else {}
    except Exception as exc:  # noqa: BLE001 - not safetensors, truncated, ...
        raise UserError(f"'{path}': not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if meta.get("format") != fmt:
        raise UserError(f"'{path}': not a dcgan-dist {what} (format {meta.get('format')!r}, expected {fmt!r})")
    return meta, tensors
