"""Read a PyTorch ``state_dict`` file into NumPy arrays without importing torch.

Both formats ``torch.save`` writes are handled: the zip archive (torch ≥ 1.6: ``*/data.pkl``
plus one raw file per storage) and the legacy stream (magic number, protocol, system info,
the pickled object, the storage keys, then each storage's element count and bytes; the
format of pytorch-fid's 2019 weight file). Only tensors, parameters and (ordered) dicts are
rebuilt; any other class in the pickle is refused, so the file cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported torch storage type {name}")
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """An (owned, contiguous) array from a flat storage, its element offset, shape and strides."""
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, load_storage):
        super().__init__(stream)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._load_storage(pid)


def _load_zip(path: str):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: no data.pkl in the torch zip archive")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode()
        cache: dict[str, np.ndarray] = {}

        def load_storage(pid):
            _, storage_type, key, _location, _numel = pid
            if key not in cache:
                dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
                raw = archive.read(f"{prefix}data/{key}")
                cache[key] = np.frombuffer(raw, dtype).astype(storage_type.dtype)
            return cache[key]

        return _Unpickler(io.BytesIO(archive.read(pkl[0])), load_storage).load()


class _Deferred:
    """A legacy-format tensor whose storage bytes follow the pickle."""

    def __init__(self, storage_key, offset, size, stride):
        self.storage_key, self.offset, self.size, self.stride = storage_key, offset, size, stride


class _LegacyUnpickler(_Unpickler):
    def find_class(self, module, name):
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"),
                              ("torch._utils", "_rebuild_tensor")}:
            return lambda storage, offset, size, stride, *unused: _Deferred(
                storage, offset, size, stride)
        return super().find_class(module, name)


def _resolve(obj, data: dict):
    if isinstance(obj, _Deferred):
        return _rebuild_tensor(data[obj.storage_key], obj.offset, obj.size, obj.stride)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, data)) for k, v in obj.items())
    return obj


def _load_legacy(path: str):
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path} is neither a torch zip archive nor a legacy torch file")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian torch files are not supported")
        dtypes: dict[str, np.dtype] = {}

        def load_storage(pid):
            _, storage_type, key, _location, _numel, view = pid
            if view is not None:
                raise pickle.UnpicklingError("storage views are not supported")
            dtypes[key] = storage_type.dtype
            return key

        result = _LegacyUnpickler(f, load_storage).load()
        data = {}
        for key in pickle.load(f):
            dtype = dtypes[key]
            (count,) = struct.unpack("<q", f.read(8))
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise ValueError(f"{path} is truncated (storage {key})")
            data[key] = np.frombuffer(raw, dtype)
    return _resolve(result, data)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} from a ``torch.save``d state dict (either format)."""
    try:
        obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as err:
        raise ValueError(f"cannot read the torch file {path}: {err}") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {str(k): np.asarray(v) for k, v in obj.items()}
