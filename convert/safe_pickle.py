"""Read PyTorch zip checkpoints (`torch.save`: pytorch_model.bin, CoreNet *.pt) without torch and
without running code from the pickle.

A torch zip holds `<name>/data.pkl` (the object tree) and `<name>/data/<key>` (raw storages). A
plain `pickle.load` of data.pkl would call whatever globals it names: that is how a malicious
checkpoint runs code. Here `find_class` resolves only the handful of names a state dict needs, to
our own inert stand-ins; anything else is refused before it is ever called. Storages become lazy
references into the zip, read one tensor at a time.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import mlx.core as mx
import numpy as np

from openelm_mlx.errors import LoadError

# torch storage class name -> numpy dtype of its elements (bfloat16 is read as raw uint16).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafePickleError(LoadError):
    """The pickle names a global that is not needed to rebuild tensors: refused, nothing run."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    entry: str  # zip entry holding the raw bytes
    storage_type: str
    numel: int


@dataclass
class PickledTensor:
    """A tensor of a torch zip checkpoint, not read yet: `load()` reads only its own storage."""

    zip_path: Path
    storage: _Storage
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    @property
    def is_bfloat16(self) -> bool:
        return self.storage.storage_type == "BFloat16Storage"

    def numpy(self) -> np.ndarray:
        dtype = np.dtype(STORAGE_DTYPES[self.storage.storage_type])
        try:
            with zipfile.ZipFile(self.zip_path) as zf:
                raw = zf.read(self.storage.entry)
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
            raise LoadError(f"cannot read storage {self.storage.entry} of {self.zip_path}: {e}") from None
        flat = np.frombuffer(raw, dtype=dtype)
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        if any(n == 0 for n in self.shape):
            return np.zeros(self.shape, dtype)
        if flat.size < needed:
            raise LoadError(f"storage {self.storage.entry} of {self.zip_path} holds {flat.size} elements, "
                            f"a tensor needs {needed}: the file is truncated or corrupt")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.shape,
                                               strides=[s * dtype.itemsize for s in self.stride])
        return np.ascontiguousarray(view)

    def load(self) -> mx.array:
        array = mx.array(self.numpy())
        return array.view(mx.bfloat16) if self.is_bfloat16 else array


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored) -> "_PendingTensor":
    return _PendingTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_ignored):
    return data  # an nn.Parameter is its tensor; requires_grad and hooks do not matter here


@dataclass
class _PendingTensor:
    storage: _Storage
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


# The only globals a state dict pickle needs, mapped to inert stand-ins.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: Path, prefix: str, entries: set):
        super().__init__(file)
        self.source, self.prefix, self.entries = source, prefix, entries

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source} was refused: its pickle references {module}.{name}, which is not needed to "
                "rebuild tensors (a checkpoint that names it may run code when loaded); nothing was executed. "
                "Only plain state dicts of tensors are converted."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # torch writes ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self.source} has an unknown storage reference {pid!r}: not a torch state dict")
        entry = f"{self.prefix}data/{pid[2]}"
        if entry not in self.entries:
            raise LoadError(f"{self.source} lacks the storage {entry}: the file is truncated or corrupt")
        return _Storage(entry, pid[1].name, int(pid[4]))


def read_torch_zip(path: Path) -> Dict[str, Any]:
    """The unpickled object of a torch zip checkpoint, with tensors as lazy `PickledTensor`s."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise LoadError(f"{path} is not a zip-format PyTorch checkpoint (truncated, corrupt, or the legacy "
                        "pre-1.6 format, which is not read because plain pickles cannot be read safely)") from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e}") from None
    with zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise LoadError(f"{path} is a zip but not a PyTorch checkpoint (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
            raise LoadError(f"{path} was saved on a big-endian machine: not supported")
        try:
            with zf.open(pickles[0]) as f:
                obj = _RestrictedUnpickler(f, source=path, prefix=prefix, entries=set(names)).load()
        except LoadError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                zipfile.BadZipFile, OSError) as e:
            raise LoadError(f"{path} has a corrupt pickle ({type(e).__name__}: {e})") from None
    return _finish(obj, path)


def _finish(obj: Any, path: Path) -> Any:
    """Replace pending tensors by PickledTensor references to `path`, recursively."""
    if isinstance(obj, _PendingTensor):
        return PickledTensor(path, obj.storage, obj.offset, obj.shape, obj.stride)
    if isinstance(obj, dict):
        return {k: _finish(v, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_finish(v, path) for v in obj)
    return obj
