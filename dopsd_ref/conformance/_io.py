"""Deterministic file output for the golden vectors.

``safetensors.torch.save_file`` is correct but makes no promise about the byte layout of its
header (the ``__metadata__`` map in particular). The goldens must regenerate *bit for bit*,
so this module writes the (simple, documented) safetensors format itself:

    [u64 little-endian N][N bytes of JSON header, space-padded to a multiple of 8][data]

with the header's keys sorted, compact separators, tensors laid out in name order, and
every tensor stored little-endian and C-contiguous. Files are read back with the
``safetensors`` library, which also validates the layout.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["write_safetensors", "read_safetensors", "dumps_json", "sha256_file"]

_DTYPES: dict[torch.dtype, str] = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, byte-deterministically.

    Args:
        path: output file.
        tensors: name -> CPU tensor of dtype float64, float32 or int64.
        metadata: optional str -> str map stored under ``__metadata__``.

    Raises:
        TypeError: unsupported dtype or a non-string metadata value.
    """
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {"data_offsets": [offset, offset + len(data)], "dtype": _DTYPES[t.dtype], "shape": list(t.shape)}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for c in chunks:
            f.write(c)


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Load a safetensors file into a dict of CPU tensors (via the ``safetensors`` library)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def dumps_json(obj: Any) -> str:
    """JSON text with sorted keys, 2-space indent and a final newline (deterministic)."""
    return json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
