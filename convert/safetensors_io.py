"""Read safetensors files one tensor at a time.

The header (8-byte length, then JSON) says where each tensor lies; a tensor is read with a plain
file read into fresh memory, so converting a checkpoint never holds more than one source tensor
(an mmap would keep every page it touched resident).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

from openelm_mlx.errors import LoadError

# safetensors dtype -> numpy dtype of the stored elements (bfloat16 is read as raw uint16).
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
          "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8,
          "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 << 20


@dataclass
class SafetensorsTensor:
    """One tensor of a safetensors file, not read yet."""

    path: Path
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file

    def numpy(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                data = np.fromfile(f, dtype=DTYPES[self.dtype], count=count)
        except OSError as e:
            raise LoadError(f"cannot read tensor {self.name} from {self.path}: {e}") from None
        if data.size != count:
            raise LoadError(f"{self.path} is truncated: tensor {self.name} is cut short")
        return data.reshape(self.shape)

    def load(self) -> mx.array:
        array = mx.array(self.numpy())
        return array.view(mx.bfloat16) if self.dtype == "BF16" else array


def read_header(path: Path) -> Tuple[Dict[str, SafetensorsTensor], Dict[str, str]]:
    """(name -> lazy tensor, metadata) of a safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoadError(f"{path} is not a safetensors file (too short: {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise LoadError(f"{path} is truncated or not a safetensors file (header length {header_len}, "
                                f"file size {size})")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LoadError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e}") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path} is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{path} is corrupt: bad header entry for tensor {name}") from None
        if dtype not in DTYPES:
            raise LoadError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if end - begin != expected or begin < 0:
            raise LoadError(f"{path} is corrupt: tensor {name} spans {end - begin} bytes, its shape needs {expected}")
        if data_start + end > size:
            raise LoadError(f"{path} is truncated: tensor {name} ends at byte {data_start + end}, "
                            f"the file has {size}")
        tensors[name] = SafetensorsTensor(path, name, dtype, shape, data_start + begin)
    return tensors, metadata
