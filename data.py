"""
Text -> bytes -> tokens -> batches. The tokenizer is the identity on bytes (vocab 256), so any file
works, UTF-8 or not, and nothing needs downloading:

    encode("hé") = [104, 195, 169]        decode([104, 195, 169]) = "hé"

The two default corpora ship with every Python:
  base      the .py sources of the standard library (no test suites, no site-packages), ~10 MB;
  finetune  the English documentation in pydoc_data.topics (~0.46 MB), or, where a Python lacks
            it, the standard library's docstrings.
A user's file (read_text_file) replaces either; check_length makes sure every split can hold a block.

Each corpus is split deterministically, in order, into train (90%), val (5%) and test (5%), and
cached as uint8 memmaps <cache_dir>/<name>/{train,val,test}.bin beside a meta.json recording the
sha256 of the text it was built from: a changed source rebuilds the cache (build_cache). Batches are
random windows of a split with their next-byte targets (get_batch), or, for the encoder, the same
windows masked as BERT's (mask_tokens), drawn on the CPU and copied to the device once (to_device).

The encoder's tasks (tasks.py) are cut from the standard library too. The files of the standard
library are split once, by file (stdlib_split_of): every task draws on that split, and the encoder's
base corpus leaves out its val and test files (glue_holdout_files), so no task evaluates on a file
the encoder pretrained on.
"""
import ast
import hashlib
import json
import os
import sysconfig

import numpy as np
import torch

SPLITS = {"train": 0.90, "val": 0.05, "test": 0.05}
CLASS_PACKAGES = ("asyncio", "email", "idlelib", "importlib",  # the package task's labels (tasks.py):
                  "multiprocessing", "tkinter", "unittest", "xml")  # each is split by file on its own


class DataError(ValueError):
    """A data source that cannot be used; the message names the file and the problem."""


def encode(text):
    return list(text.encode("utf-8")) if isinstance(text, str) else list(text)


def decode(ids):
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- the sources

def stdlib_sources(exclude=()):
    """Sorted paths of the standard library's .py files, skipping test suites and site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = ("test", "tests", "idle_test", "site-packages", "__pycache__")
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    excluded = set(exclude)
    return [p for p in paths if p not in excluded]


def base_corpus(exclude=()):
    paths = stdlib_sources(exclude)
    text = b"".join(open(p, "rb").read() + b"\n" for p in paths)
    return text, f"{len(paths)} .py files of the standard library at {sysconfig.get_paths()['stdlib']}"


def finetune_corpus():
    try:
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8"), "pydoc_data.topics"
    except ImportError:
        print("note: this Python has no pydoc_data; fine-tuning on the standard library's docstrings instead")
        docs = []
        for p in stdlib_sources():
            try:
                tree = ast.parse(open(p, "rb").read())
            except (SyntaxError, ValueError):
                continue
            docs += [d for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                     and (d := ast.get_docstring(n))]
        return "\n\n".join(docs).encode("utf-8"), "docstrings of the standard library"


def read_text_file(path):
    """The bytes of a user's file, or a DataError naming what is wrong with it."""
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist")
    if os.path.isdir(path):
        raise DataError(f"data file {path} is a directory, not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"data file {path} cannot be read: {e.strerror}") from None
    if not data:
        raise DataError(f"data file {path} is empty")
    return data


def check_length(data, block_size, source):
    """Every split must hold at least one block plus one token (the shifted target)."""
    need = block_size + 1
    shortest = min(int(len(data) * f) for f in SPLITS.values())
    if shortest < need:
        least = int(need / min(SPLITS.values())) + 1
        raise DataError(f"{source} is too short: {len(data)} tokens, but each split needs block_size + 1 = "
                        f"{need}, so the text needs at least {least} tokens (or a smaller --block-size)")


# ----------------------------------------------------------------------------- the split by file

def fill_splits(paths, root):
    """{path: split}: the files, ordered by a hash of their path relative to root, fill test with the
    first tenth of their bytes (one file at least), val with the next tenth, and train with the rest."""
    order = sorted(paths, key=lambda p: hashlib.sha256(os.path.relpath(p, root).encode()).hexdigest())
    total = sum(os.path.getsize(p) for p in order)
    filled, split_of = {"test": 0, "val": 0, "train": 0}, {}
    for p in order:
        split = next(s for s in ("test", "val", "train")
                     if s == "train" or filled[s] == 0 or filled[s] < 0.1 * total)
        split_of[p] = split
        filled[split] += os.path.getsize(p)
    return split_of


def stdlib_split_of():
    """The split of every standard-library file, one assignment shared by all the encoder's tasks
    (tasks.py): each of the CLASS_PACKAGES is filled on its own (fill_splits), all the other files
    together."""
    root = sysconfig.get_paths()["stdlib"]
    groups = {}
    for p in stdlib_sources():
        top = os.path.relpath(p, root).split(os.sep)[0]
        groups.setdefault(top if top in CLASS_PACKAGES else "", []).append(p)
    return {p: s for paths in groups.values() for p, s in fill_splits(paths, root).items()}


def glue_holdout_files():
    """Every file in the val or test split of stdlib_split_of, which all of tasks.py's tasks share: the
    encoder's base corpus leaves them out, so it pretrains on no file a task evaluates on."""
    return sorted(p for p, s in stdlib_split_of().items() if s != "train")


# ----------------------------------------------------------------------------- the cache

def split_bounds(n):
    bounds, start = {}, 0
    for i, (name, frac) in enumerate(SPLITS.items()):
        end = n if i == len(SPLITS) - 1 else start + int(n * frac)
        bounds[name] = (start, end)
        start = end
    return bounds


def build_cache(name, data, source, cache_dir, tokenizer=None):
    """Write (or reuse) <cache_dir>/<name>/{train,val,test}.bin; returns {split: memmap}. Bytes are the
    tokens (uint8); with a tokenizer (GPT-2's BPE, bpe.py) the text's token ids are, as uint16 while the
    vocabulary fits (uint32 past 65,536), and the cache is tied to that tokenizer's files too."""
    folder = os.path.join(cache_dir, name)
    meta_path = os.path.join(folder, "meta.json")
    digest = hashlib.sha256(data if tokenizer is None else data + tokenizer.digest().encode()).hexdigest()
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        fresh = meta.get("sha256") == digest
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        if tokenizer is None:
            tokens = np.frombuffer(data, dtype=np.uint8)
        else:
            dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
            tokens = np.array(tokenizer.encode(data.decode("utf-8", errors="replace")), dtype=dtype)
        meta = {"source": source, "sha256": digest, "tokens": len(tokens),
                "vocab_size": 256 if tokenizer is None else tokenizer.vocab_size,
                "splits": {k: list(v) for k, v in split_bounds(len(tokens)).items()}}
        if tokenizer is not None:
            meta["dtype"] = tokens.dtype.name
        os.makedirs(folder, exist_ok=True)
        for split, (a, b) in meta["splits"].items():
            tmp = os.path.join(folder, f"{split}.bin.tmp")
            tokens[a:b].tofile(tmp)
            os.replace(tmp, os.path.join(folder, f"{split}.bin"))
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, meta_path)  # last: a cache without its meta is rebuilt next time
    dtype = np.dtype(meta.get("dtype", "uint8"))
    return {split: np.memmap(os.path.join(folder, f"{split}.bin"), dtype=dtype, mode="r") for split in SPLITS}


# ----------------------------------------------------------------------------- batches

def get_batch(data, batch_size, block_size, generator=None):
    """batch_size random windows of data: inputs x and next-token targets y, both (B, T), on the CPU.

    Batches stay on the CPU until the training loop has cut this process's slice of them: one
    host-to-device copy each (to_device)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    starts = ix.tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts])  # (B, T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
    return x, y


def to_device(t, device):
    """One host-to-device copy, pinned and asynchronous on CUDA."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def mask_tokens(x, mask_id, rate=0.15, generator=None):
    """BERT masking of a CPU batch: pick `rate` of the positions; of those 80% -> mask_id, 10% -> random
    byte, 10% unchanged. Targets are the original tokens at picked positions and -1 (ignored) elsewhere."""
    u = torch.rand(x.shape, generator=generator)
    picked = u < rate
    targets = torch.where(picked, x, torch.full_like(x, -1))
    action = torch.rand(x.shape, generator=generator)
    randoms = torch.randint(256, x.shape, generator=generator)
    x = torch.where(picked & (action < 0.8), torch.full_like(x, mask_id), x)
    x = torch.where(picked & (action >= 0.8) & (action < 0.9), randoms, x)
    return x, targets
