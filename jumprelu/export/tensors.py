""".safetensors files through the `safetensors` NumPy API (no torch), with one-line errors.

A .safetensors file holds named arrays and a JSON header, never pickled objects, so reading one
runs no code. bfloat16 arrays (which NumPy lacks) are read through ml_dtypes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jumprelu import fs
from jumprelu.errors import UserError
from jumprelu.store.format import is_float

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class FormatError(UserError):
    """A file in a released SAE layout that does not hold what the layout says; one line naming the file."""


def read(path: str) -> dict[str, np.ndarray]:
    """Every array of a .safetensors file, as NumPy arrays in their stored dtype."""
    from safetensors import SafetensorError, deserialize

    try:
        data = fs.read_bytes(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:  # a directory named like the file, no permission
        raise FormatError(f"{path}: cannot be read as a .safetensors file ({e.strerror or e})") from None
    try:
        views = deserialize(data)
    except SafetensorError as e:
        raise FormatError(f"{path}: not a readable .safetensors file ({e})") from None
    out = {}
    for name, view in views:
        if view["dtype"] not in _DTYPES:
            raise FormatError(f"{path}: {name} has dtype {view['dtype']}, expected a float type")
        out[name] = np.frombuffer(view["data"], dtype=_DTYPES[view["dtype"]]).reshape(view["shape"])
    return out


def write(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes contiguous little-endian arrays (atomically for local paths)."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    fs.write_bytes_atomically(path, save(arrays, metadata=metadata))


def check_exact(path: str, found: dict[str, np.ndarray], expected: dict[str, tuple], optional=()) -> None:
    """Exactly the `expected` keys (plus any `optional` ones), each of its shape, a float dtype, finite.

    `expected` maps key -> shape; a shape entry None is free (it is fixed by the first array).
    """
    missing = [k for k in expected if k not in found]
    extra = sorted(k for k in found if k not in expected and k not in optional)
    if missing or extra:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {extra}"] if extra else [])
        raise FormatError(f"{path}: {'; '.join(parts)}; expected exactly {list(expected)}")
    for k, shape in expected.items():
        if tuple(found[k].shape) != tuple(shape):
            raise FormatError(f"{path}: {k} has shape {list(found[k].shape)}, expected {list(shape)}")
        if not is_float(found[k].dtype):
            raise FormatError(f"{path}: {k} has dtype {found[k].dtype}, expected a float type")
        if not np.isfinite(np.asarray(found[k], np.float32)).all():
            raise FormatError(f"{path}: {k} holds NaN or Inf")
