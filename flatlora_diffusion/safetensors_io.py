"""safetensors files on disk: header reading that fails clearly, the kohya/A1111 hash, atomic writes.

Layout of a safetensors file: 8 bytes little-endian header length N, N bytes of JSON header
(tensor name -> dtype, shape, data_offsets; optional "__metadata__" of str -> str), then the data
section. The data section does not depend on the metadata, which is what lets a file carry the hash
of its own tensor data.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from . import faults

_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
_CHUNK = 1024 * 1024


class SafetensorsFormatError(ValueError):
    """The file is not a readable safetensors file (one-line message)."""


def read_header(path) -> tuple[dict, dict[str, str]]:
    """Validate the framing of a safetensors file and return (tensor entries, metadata).

    Checks what a loader would trip over later, with a one-line reason: the file is too short, the
    header length or JSON is not safetensors, or the data section is shorter than the header says
    (a truncated download or copy).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{path.name} is not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > _MAX_HEADER:
            raise SafetensorsFormatError(f"{path.name} is not a safetensors file (bad header length)")
        if 8 + n > size:
            raise SafetensorsFormatError(f"{path.name} is truncated: its header is cut off")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsFormatError(f"{path.name} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path.name} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsFormatError(f"{path.name} has a malformed __metadata__ entry")
    data_size = size - 8 - n
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            entry["dtype"], list(entry["shape"])
        except (TypeError, KeyError, ValueError):
            raise SafetensorsFormatError(f"{path.name} is not a safetensors file (bad entry {name!r})") from None
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise SafetensorsFormatError(f"{path.name} is not a safetensors file (bad offsets of {name!r})")
        end = max(end, stop)
    if end > data_size:
        raise SafetensorsFormatError(
            f"{path.name} is truncated: the header needs {end} data bytes, the file has {data_size}"
        )
    return header, {str(k): str(v) for k, v in metadata.items()}


def read_metadata(path) -> dict[str, str]:
    return read_header(path)[1]


def _data_offset(f) -> int:
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    return 8 + n


def file_data_sha256(path) -> str:
    """sha256 hex of the data section of a safetensors file.

    This is kohya sd-scripts' ``addnet_hash_safetensors`` and AUTOMATIC1111's
    ``hashes.addnet_hash_safetensors``: everything after the 8-byte length and the JSON header.
    AUTOMATIC1111 shows its first 12 hex digits as the LoRA's short hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(_data_offset(f))
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _prepare(tensors: Mapping) -> dict:
    import torch

    out = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        if tensor.device.type == "meta":
            raise ValueError(f"{name}: a meta tensor has no data to write")
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def tensors_data_sha256(tensors: Mapping) -> str:
    """The `file_data_sha256` that a file holding `tensors` will have, whatever its metadata."""
    import safetensors.torch

    blob = safetensors.torch.save(_prepare(tensors))
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(memoryview(blob)[8 + n :]).hexdigest()


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # A hard link never replaces an existing file: no window between "exists?" and "write".
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:  # file systems without hard links
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.EACCES):
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def save_safetensors_atomic(
    tensors: Mapping,
    path,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    expected_data_sha256: str | None = None,
) -> Path:
    """Write `tensors` to `path` so that `path` is either the complete new file or untouched.

    The file is written to a temporary name in the same folder and moved into place. Without
    `overwrite`, an existing `path` raises FileExistsError and is kept. With `expected_data_sha256`,
    the written data section is hashed and compared before the file is published. On any error the
    temporary file is removed.
    """
    import safetensors.torch

    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must be str -> str; not so for {bad[:3]}")
    prepared = _prepare(tensors)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(prepared, tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if expected_data_sha256 is not None and file_data_sha256(tmp) != expected_data_sha256:
            raise RuntimeError(f"hash of the written data of {path.name} does not match the precomputed hash")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        faults.hit("lora_tmp")
        _publish(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
