"""The on-disk LMS format (float32 .npy of shape [1, N_MELS, T]) and its one validity check.

`prepare` uses it to list only complete outputs and `train` to validate a list
before the first step, so both agree on what a usable file is. Torch-free, and
it reads only the header: fast enough for millions of files.
"""

import os
import re

import numpy as np

N_MELS = 80

# What np.save writes for a float32 [1, 80, T]: recognised without parsing.
_NPY_HEADER = re.compile(rb"\x93NUMPY\x01\x00v\x00\{'descr': '<f4', 'fortran_order': False, "
                         rb"'shape': \(1, 80, ([0-9]+)\), \} *\n$")
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


class WrongShape(ValueError):
    """A complete .npy, but not float32 [1, n_mels, T]."""


def check_lms_file(path, n_mels: int = N_MELS) -> int:
    """Frames of a valid LMS file; ValueError when it is not a complete float32 [1, n_mels, T].

    Compares the file size with the header, so a truncated copy is caught
    without loading or mapping the data.
    """
    with open(path, "rb") as f:
        head = f.read(128)
        fast = _NPY_HEADER.match(head) if n_mels == 80 else None
        if fast:
            frames = _check_shape((1, n_mels, int(fast.group(1))), np.dtype(np.float32), n_mels)
            size = os.fstat(f.fileno()).st_size
            if size != 128 + n_mels * 4 * frames:
                raise ValueError(f"{size} bytes do not match its header [1, {n_mels}, {frames}] (truncated?)")
            return frames
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
        except ValueError as e:
            raise ValueError(f"not an .npy file ({e})") from e
        if version not in _HEADER_READERS:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return _check_shape(arr.shape, arr.dtype, n_mels)
        shape, _, dtype = _HEADER_READERS[version](f)
        data_start = f.tell()
        size = os.fstat(f.fileno()).st_size
    frames = _check_shape(shape, dtype, n_mels)
    if size != data_start + int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{size} bytes do not match its header {list(shape)} (truncated?)")
    return frames


def _check_shape(shape, dtype, n_mels: int) -> int:
    if dtype != np.float32 or len(shape) != 3 or tuple(shape[:2]) != (1, n_mels) or shape[2] < 1:
        raise WrongShape(f"expected float32 [1, {n_mels}, T] with T >= 1, got {dtype} shape "
                         f"{list(shape)}")
    return int(shape[2])
