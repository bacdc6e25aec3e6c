"""Reading a `.npy` file of activations [N, d_model], the input of `jumprelu.store convert`."""

from __future__ import annotations

import os

import numpy as np

from jumprelu.errors import DataError

NPY_MAGIC = b"\x93NUMPY"


def open_npy(path: str) -> np.ndarray:
    """Opens a `.npy` of shape [N, d] read-only as a memory map and checks shape and dtype."""
    if os.path.isdir(path):  # was "no such file"
        raise DataError(f"{path}: a directory; expected a .npy file of activations [N, d_model]")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        try:
            with open(path, "rb") as fh:
                header = fh.read(len(NPY_MAGIC))
        except OSError:  # unreadable (permissions): NumPy's own error says so
            header = NPY_MAGIC
        if header != NPY_MAGIC:  # NumPy takes any other file for a pickle and says so
            raise DataError(f"{path}: not a .npy file (it does not start with the .npy header)") from None
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    if isinstance(rows, np.lib.npyio.NpzFile):  # np.savez's archive, not one array
        keys = list(rows.files)
        rows.close()
        raise DataError(f"{path}: expected a .npy of one array [N, d_model], found a .npz archive of {keys}")
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise DataError(f"{path}: expected shape [N, d_model] with N, d_model > 0, found {list(rows.shape)}")
    if rows.dtype.kind == "V" and rows.dtype.itemsize == 2 and rows.dtype.names is None:
        # np.save writes a bfloat16 (ml_dtypes) array as raw 2-byte values: its header no longer says bfloat16
        raise DataError(
            f"{path}: expected float activations, found raw 2-byte values (dtype {rows.dtype.str}), which is how "
            "np.save writes a bfloat16 array; save it as float32 (x.astype(np.float32)), convert with --dtype bfloat16"
        )
    if not np.issubdtype(rows.dtype, np.floating):
        raise DataError(f"{path}: expected float activations, found dtype {rows.dtype}")
    return rows
