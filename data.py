"""
Text -> bytes -> tokens -> batches. The tokenizer is the identity on bytes (vocab 256), so any file
works, UTF-8 or not, and nothing needs downloading:

    encode("hé") = [104, 195, 169]        decode([104, 195, 169]) = "hé"

The two default corpora ship with every Python:
  base      the .py sources of the standard library (no test suites, no site-packages), ~10 MB;
  finetune  the English documentation in pydoc_data.topics (~0.46 MB), or, where a Python lacks
            it, the standard library's docstrings.
Each corpus is split deterministically, in order, into train (90%), val (5%) and test (5%), and
cached as uint8 memmaps <cache_dir>/<name>/{train,val,test}.bin beside a meta.json recording the
sha256 of the text it was built from: a changed source rebuilds the cache.

For the encoder: classification_splits() cuts fixed-length snippets of standard-library source,
labelled by the package they come from, split by file so that no file is in two splits.

The tasks at the end (LMTask, MLMTask, ClassifyTask) are what the training loop talks to: a batch
drawn on the CPU, the number of targets in a slice of it (its weight in the batch's mean loss), the
loss of a model on it, and an evaluation on a split.
"""
import ast
import contextlib
import hashlib
import json
import os
import sysconfig

import numpy as np
import torch

SPLITS = {"train": 0.90, "val": 0.05, "test": 0.05}
CLASS_PACKAGES = ("asyncio", "email", "idlelib", "importlib", "multiprocessing", "tkinter", "unittest", "xml")


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


def read_corpora(args):
    """What a run trains on, read and checked before anything is written: (base, fine-tuning), where
    base is (text, source, cache name) and fine-tuning the same, or the classification splits.
    `args` needs arch, task, block_size, and the texts and paths of --base-data and --data (or None)."""
    holdout = classification_holdout_files() if args.arch == "encoder" else ()
    if args.base_text is not None:
        base = (args.base_text, args.base_data, "base-file")
    else:
        text, src = base_corpus(exclude=holdout)
        check_length(text, args.block_size, "the standard library's sources")
        base = (text, src, ("encoder-" if holdout else "") + "base")
    if args.task == "classify":
        splits = classification_splits(args.block_size)
        empty = [s for s, (x, _) in splits.items() if len(x) == 0]
        if empty:
            raise DataError(f"--block-size {args.block_size} leaves no classification snippet in the {empty[0]} split")
        return base, splits
    if args.finetune_text is not None:
        return base, (args.finetune_text, args.data, "finetune-file")
    text, src = finetune_corpus()
    check_length(text, args.block_size, f"the fine-tuning corpus ({src})")
    return base, (text, src, "finetune")


# ----------------------------------------------------------------------------- the cache

def split_bounds(n):
    bounds, start = {}, 0
    for i, (name, frac) in enumerate(SPLITS.items()):
        end = n if i == len(SPLITS) - 1 else start + int(n * frac)
        bounds[name] = (start, end)
        start = end
    return bounds


def build_cache(name, data, source, cache_dir):
    """Write (or reuse) <cache_dir>/<name>/{train,val,test}.bin; returns {split: uint8 memmap}."""
    folder = os.path.join(cache_dir, name)
    meta_path = os.path.join(folder, "meta.json")
    digest = hashlib.sha256(data).hexdigest()
    meta = {"source": source, "sha256": digest, "tokens": len(data), "vocab_size": 256,
            "splits": {k: list(v) for k, v in split_bounds(len(data)).items()}}
    try:
        with open(meta_path) as f:
            fresh = json.load(f).get("sha256") == digest
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        os.makedirs(folder, exist_ok=True)
        tokens = np.frombuffer(data, dtype=np.uint8)
        for split, (a, b) in meta["splits"].items():
            tmp = os.path.join(folder, f"{split}.bin.tmp")
            tokens[a:b].tofile(tmp)
            os.replace(tmp, os.path.join(folder, f"{split}.bin"))
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, meta_path)  # last: a cache without its meta is rebuilt next time
    return {split: np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint8, mode="r") for split in SPLITS}


def get_batch(data, batch_size, block_size, generator=None):
    """batch_size random windows of data: inputs x and next-token targets y, both (B, T), on the CPU.

    Batches stay on the CPU until the training loop has cut this process's slice of them: one
    host-to-device copy each (to_device)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])  # (B, T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    return x, y


def to_device(t, device):
    """One host-to-device copy, pinned and asynchronous on CUDA."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ----------------------------------------------------------------------------- encoder data

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


def classification_files():
    """{package: sorted files} for the CLASS_PACKAGES, and each file's split, fixed by its sha256."""
    root = sysconfig.get_paths()["stdlib"]
    files = {pkg: [p for p in stdlib_sources() if os.path.relpath(p, root).split(os.sep)[0] == pkg]
             for pkg in CLASS_PACKAGES}
    split_of = {}
    for pkg, paths in files.items():
        if len(paths) < 3:
            raise DataError(f"package {pkg} has {len(paths)} source files here; the task needs 3 to split by file")
        # Order files by a hash of their path, then fill test with the first tenth of the bytes
        # (one file at least), val with the next tenth, and train with the rest.
        order = sorted(paths, key=lambda p: hashlib.sha256(os.path.relpath(p, root).encode()).hexdigest())
        total = sum(os.path.getsize(p) for p in order)
        filled = {"test": 0, "val": 0, "train": 0}
        for p in order:
            split = next(s for s in ("test", "val", "train")
                         if s == "train" or filled[s] == 0 or filled[s] < 0.1 * total)
            split_of[p] = split
            filled[split] += os.path.getsize(p)
        if filled["train"] == 0:
            raise DataError(f"package {pkg}: no file left for the train split")
    return files, split_of


def classification_splits(block_size, max_per_class=None):
    """{split: (x (N, block_size) int64, y (N,) int64)}: non-overlapping snippets, balanced across
    labels by keeping, in each split, as many snippets per label as the smallest label has."""
    files, split_of = classification_files()
    out = {}
    for split in SPLITS:
        per_label = []
        for label, pkg in enumerate(CLASS_PACKAGES):
            chunks = []
            for p in files[pkg]:
                if split_of[p] != split:
                    continue
                data = np.frombuffer(open(p, "rb").read(), dtype=np.uint8)
                n = len(data) // block_size
                chunks.append(data[:n * block_size].reshape(n, block_size))
            per_label.append(np.concatenate(chunks) if chunks else np.zeros((0, block_size), np.uint8))
        n = min(len(c) for c in per_label)
        if max_per_class and split == "train":
            n = min(n, max_per_class)
        # spread the kept snippets over each label's files rather than taking the first files only
        picks = [c[np.linspace(0, len(c) - 1, n).astype(int)] if n else c[:0] for c in per_label]
        x = torch.from_numpy(np.concatenate(picks).astype(np.int64))
        y = torch.arange(len(CLASS_PACKAGES)).repeat_interleave(n)
        out[split] = (x, y)
    return out


def classification_holdout_files():
    """The val and test files of the classification task: the encoder must not pretrain on them."""
    _, split_of = classification_files()
    return sorted(p for p, s in split_of.items() if s != "train")


# ----------------------------------------------------------------------------- tasks

def amp(device, dtype):
    """bf16 autocast when dtype is "bf16", else nothing."""
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LMTask:
    """Next-byte prediction on a cached corpus. `args` needs batch_size, block_size, eval_iters,
    device_name and dtype; evaluation uses the same windows every time (a generator of its own)."""

    def __init__(self, splits, args):
        self.splits, self.args = splits, args

    def batch(self, split, gen):
        return get_batch(self.splits[split], self.args.batch_size, self.args.block_size, gen)  # CPU (B, T)

    def count(self, y):
        """Targets in y: a slice's weight in the mean loss of the whole batch."""
        return y.numel()

    def loss(self, model, x, y):
        return model(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model, split):
        model.eval()
        gen, device = torch.Generator().manual_seed(1234), self.args.device_name
        total = torch.zeros((), device=device)
        for _ in range(self.args.eval_iters):
            x, y = (to_device(t, device) for t in self.batch(split, gen))
            with amp(device, self.args.dtype):
                total += self.loss(model, x, y).float()
        model.train()
        return {"loss": total.item() / self.args.eval_iters}  # one host sync per evaluation


class MLMTask(LMTask):
    """Masked-byte prediction for the encoder: 15% of positions, BERT's 80/10/10 replacement,
    masked on the CPU before the batch's single copy to the device."""

    def batch(self, split, gen):
        x, _ = super().batch(split, gen)
        return mask_tokens(x, mask_id=256, generator=gen)

    def count(self, y):
        return int((y != -1).sum())  # y is on the CPU: no device sync


class ClassifyTask:
    """Snippets of standard-library source labelled by package; accuracy over the whole split."""

    def __init__(self, splits, args):
        self.splits, self.args = splits, args

    def batch(self, split, gen):
        x, y = self.splits[split]
        ix = torch.randint(len(x), (self.args.batch_size,), generator=gen)
        return x[ix], y[ix]  # CPU (B, T), (B,)

    def count(self, y):
        return len(y)

    def loss(self, model, x, y):
        return model.classify(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model, split):
        model.eval()
        x, y = self.splits[split]
        device = self.args.device_name
        loss, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
        for i in range(0, len(x), 256):
            xb, yb = to_device(x[i:i + 256], device), to_device(y[i:i + 256], device)
            with amp(device, self.args.dtype):
                logits, l = model.classify(xb, yb)
            loss += l.float() * len(xb)
            correct += (logits.argmax(-1) == yb).sum()
        model.train()
        return {"loss": loss.item() / len(x), "acc": correct.item() / len(x)}
