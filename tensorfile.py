"""
safetensors, read and written by hand: a file of named tensors that holds no code, so reading one
cannot run anything (unlike a pickle). The layout, byte for byte:

    N       8 bytes, little-endian unsigned: the header's length
    header  N bytes of JSON, padded with spaces to a multiple of 8:
            {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
             "__metadata__": {str: str}}            # optional; offsets count from the header's end
    data    every tensor's raw little-endian, C-order bytes, one after the other

    write(fh, {"w": torch.ones(2, 3)}, metadata={"format": "x"})   # fh: a file opened "wb"
    tensors, metadata = read("model.safetensors")                  # {name: tensor}, {str: str}

The Hugging Face tools write model.safetensors and PEFT's adapter_model.safetensors in this format;
adapters.py (the LoRA export) and gpt2.py (GPT-2 folders) use this file for both directions, and every
file the project writes goes through atomic_write: a kill leaves the old file or the new, never half.
"""
import json
import os
import struct
import sys

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 2 ** 20  # a header longer than this is not a header: refuse before reading it


class TensorFileError(ValueError):
    """The file is not a safetensors file, or not a well-formed one: one line that says why."""


def header_bytes(tensors, metadata=None):
    """The 8-byte length and the padded JSON header of `tensors` ({name: tensor}) laid out in order."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise TensorFileError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write(fh, tensors, metadata=None):
    """Write `tensors` ({name: tensor}, any device) and `metadata` ({str: str}) to the binary file fh."""
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    fh.write(header_bytes(tensors, metadata))
    for t in tensors.values():
        fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def read_header(f, size, path):
    """(header dict, N) of the open file f of `size` bytes, checked entry by entry."""
    head = f.read(8)
    if len(head) < 8:
        raise TensorFileError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8):
        raise TensorFileError(f"{path} is not a safetensors file (a header of {n} bytes in a file of {size})")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TensorFileError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path} is not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise TensorFileError(f"{path}: __metadata__ must map strings to strings")
            continue
        ok = isinstance(info, dict) and info.get("dtype") in DTYPES and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) for o in info["data_offsets"])
        if not ok:
            raise TensorFileError(f"{path}: tensor {name!r} has a malformed header entry")
        begin, stop = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if not 0 <= begin <= stop <= size - 8 - n or stop - begin != numel * DTYPES[info["dtype"]].itemsize:
            raise TensorFileError(f"{path}: tensor {name!r} has offsets {begin}..{stop} that do not fit "
                                  f"its shape {info['shape']} and dtype {info['dtype']} in the file")
        end = max(end, stop)
    if end != size - 8 - n:
        raise TensorFileError(f"{path}: the data is {size - 8 - n} bytes, the tensors cover {end}")
    return header, n


def read(path):
    """({name: tensor} on the CPU, {str: str} metadata) of a safetensors file; the data is read once."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header, n = read_header(f, size, path)
            data = bytearray(size - 8 - n)
            f.readinto(data)
    except FileNotFoundError:
        raise TensorFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise TensorFileError(f"{path} is a directory, not a file") from None
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        dtype, (begin, stop) = DTYPES[info["dtype"]], info["data_offsets"]
        flat = torch.frombuffer(data, dtype=dtype, count=(stop - begin) // dtype.itemsize, offset=begin) \
            if stop > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])  # shares the one buffer: nothing is copied twice
    return tensors, metadata


def atomic_write(path, write):
    """write(fh) into a temporary file beside path, fsync, rename: a kill leaves the old file or the new."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
