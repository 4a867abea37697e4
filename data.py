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

For the encoder, a small GLUE cut from the standard library (GLUE_TASKS, glue_splits): cola, does this
snippet of Python parse (real statements against the same kind after one token-level corruption; Matthews
correlation, as CoLA); pairs, does this call bind to this def or raise TypeError (a def of a file over the
arguments of a call of the same file; accuracy and F1, as MRPC, QNLI); package, which of 8 packages a
snippet comes from (accuracy). All share one split of the files (stdlib_split_of): no file is in two
splits, and the encoder pretrains on none of their val and test files (glue_holdout_files). All three are
learned by fine-tuning; only package told the methods apart when measured (README), so the benchmark's
average is over package alone, and cola and pairs stay as tasks.

The tasks at the end (LMTask, MLMTask, ClassifyTask and its ColaTask and PairsTask) are what the training
loop talks to: a batch drawn on the CPU, the number of targets in a slice of it (its weight in the batch's
mean loss), the loss of a model on it, and an evaluation on a split.
"""
import ast
import bisect
import collections
import contextlib
import copy
import functools
import hashlib
import inspect
import io
import json
import math
import os
import sysconfig
import textwrap
import tokenize
import warnings

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
    holdout = glue_holdout_files() if args.arch == "encoder" else ()  # one base for every task
    if args.base_text is not None:
        base = (args.base_text, args.base_data, "base-file")
    else:
        text, src = base_corpus(exclude=holdout)
        check_length(text, args.block_size, "the standard library's sources")
        base = (text, src, ("encoder-" if holdout else "") + "base")
    if args.task in GLUE_TASKS:
        splits = glue_splits(args.task, args.block_size)
        empty = [s for s, (x, _) in splits.items() if len(x) == 0]
        if empty:
            raise DataError(f"--block-size {args.block_size} leaves no {args.task} example in the {empty[0]} split")
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
    """The split of every standard-library file, one assignment shared by all the encoder's tasks: each
    of the CLASS_PACKAGES is filled on its own (fill_splits), all the other files together."""
    root = sysconfig.get_paths()["stdlib"]
    groups = {}
    for p in stdlib_sources():
        top = os.path.relpath(p, root).split(os.sep)[0]
        groups.setdefault(top if top in CLASS_PACKAGES else "", []).append(p)
    return {p: s for paths in groups.values() for p, s in fill_splits(paths, root).items()}


def classification_files():
    """{package: sorted files} for the CLASS_PACKAGES, and each file's split (stdlib_split_of)."""
    root = sysconfig.get_paths()["stdlib"]
    shared = stdlib_split_of()
    files = {pkg: [p for p in stdlib_sources() if os.path.relpath(p, root).split(os.sep)[0] == pkg]
             for pkg in CLASS_PACKAGES}
    for pkg, paths in files.items():
        if len(paths) < 3:
            raise DataError(f"package {pkg} has {len(paths)} source files here; the task needs 3 to split by file")
        if all(shared[p] != "train" for p in paths):
            raise DataError(f"package {pkg}: no file left for the train split")
    return files, {p: shared[p] for paths in files.values() for p in paths}


def package_picks(block_size, max_per_class=None):
    """{split: [per label: (snippets (n, block_size) uint8, file of each, byte offset of each)]}: the
    files' non-overlapping snippets, as many per label as the smallest label has in that split."""
    files, split_of = classification_files()
    out = {}
    for split in SPLITS:
        per_label = []
        for pkg in CLASS_PACKAGES:
            chunks, where = [], []
            for p in files[pkg]:
                if split_of[p] != split:
                    continue
                data = np.frombuffer(open(p, "rb").read(), dtype=np.uint8)
                n = len(data) // block_size
                chunks.append(data[:n * block_size].reshape(n, block_size))
                where += [(p, i * block_size) for i in range(n)]
            chunks = np.concatenate(chunks) if chunks else np.zeros((0, block_size), np.uint8)  # (n, T)
            per_label.append((chunks, where))
        n = min(len(c) for c, _ in per_label)
        if max_per_class and split == "train":
            n = min(n, max_per_class)
        # spread the kept snippets over each label's files rather than taking the first files only
        picks = [np.linspace(0, len(c) - 1, n).astype(int) if n else np.zeros(0, int) for c, _ in per_label]
        out[split] = [(c[ix], [where[i][0] for i in ix], [where[i][1] for i in ix])
                      for (c, where), ix in zip(per_label, picks)]
    return out


def classification_splits(block_size, max_per_class=None):
    """{split: (x (N, block_size) int64, y (N,) int64)}: non-overlapping snippets, balanced across
    labels by keeping, in each split, as many snippets per label as the smallest label has."""
    out = {}
    for split, per_label in package_picks(block_size, max_per_class).items():
        x = torch.from_numpy(np.concatenate([c for c, _, _ in per_label]).astype(np.int64))  # (N, T)
        y = torch.arange(len(CLASS_PACKAGES)).repeat_interleave(len(per_label[0][0]))  # (N,)
        out[split] = (x, y)
    return out


def classification_holdout_files():
    """The val and test files of the classification task: the encoder must not pretrain on them."""
    _, split_of = classification_files()
    return sorted(p for p, s in split_of.items() if s != "train")


# ----------------------------------------------------------------------------- understanding tasks

GLUE_TASKS = {  # name -> what the encoder is asked: a small GLUE, cut from the standard library
    "cola": "acceptability (as CoLA): does this snippet of Python parse? metric: Matthews correlation",
    "pairs": "pair matching (as MRPC, QNLI): does this call bind to this def, or raise TypeError? "
             "metrics: accuracy, F1",
    "package": "which of 8 standard-library packages is this snippet from? metric: accuracy",
}
PAD = 32        # rows are right-padded with spaces: a common byte, and trailing spaces never change a parse
QUOTA = {"train": 100_000, "val": 1000, "test": 1000}  # rows per split at most, as many of each label
PER_FILE = {"val": 40, "test": 40}  # rows from one file at most: no file dominates val or test (train: all)
Example = collections.namedtuple("Example", "text label file line note")
Example.__doc__ = """One example, as text before clipping and padding. line: where in file the snippet
(cola, package) or the call (pairs) starts. note: cola, the corruption of a negative ("" for a
positive); pairs, the line of the def shown."""


def fits(text, block_size):
    """text clipped to block_size bytes of UTF-8 at most (a character cut in two is dropped)."""
    return text.encode("utf-8")[:block_size].decode("utf-8", errors="ignore")


def parses(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes and the like only warn: errors count here
        try:
            ast.parse(text)
            return True
        except (SyntaxError, ValueError):
            return False


def file_order(split):
    """[(path, seed)] of a split's files, ordered by the sha256 of their relative path, which also seeds
    each file's draws: examples are drawn file by file, the same way every time and on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    digests = {p: hashlib.sha256(os.path.relpath(p, root).encode()).hexdigest()
               for p, s in stdlib_split_of().items() if s == split}
    return [(p, int(digests[p][:16], 16)) for p in sorted(digests, key=digests.get)]


@functools.lru_cache(maxsize=None)
def outline(path):
    """(lines, statements, (functions, calls)) of one source file, from its one ast.parse (kept: the
    tasks share it). A statement is (first line, last line, column, its bodies of statements); functions
    and calls are functions_of's and calls_of's."""
    try:
        src = open(path, "rb").read().decode("utf-8")
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return (), (), ((), ())
    lines = tuple(src.replace("\r\n", "\n").replace("\r", "\n").split("\n"))

    def statement(node):
        subs = [getattr(node, f, None) or [] for f in ("body", "orelse", "finalbody")]
        subs += [h.body for h in getattr(node, "handlers", [])]  # try: except
        subs += [c.body for c in getattr(node, "cases", [])]  # match: case
        bodies = tuple(tuple(map(statement, s)) for s in subs if s)
        return node.lineno, node.end_lineno, node.col_offset, bodies

    return lines, tuple(map(statement, tree.body)), (functions_of(tree), calls_of(tree))


def functions_of(tree):
    """outline's functions: every def not in a class, and every one in a class taking self (without a
    default) and not decorated, as (def line, its def renamed f, without annotations and, for a method,
    without self, as a call self.f(...) sees it: 'def f(a, b=0): ...', the inspect.Signature of that)."""
    out = []

    def visit(node, in_class):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef):
                positional = child.args.posonlyargs + child.args.args
                method = [a.arg for a in positional[:1]] == ["self"] and len(child.args.defaults) < len(positional)
                if not in_class or (not child.decorator_list and method):
                    args = copy.deepcopy(child.args)
                    for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                        if a:
                            a.annotation = None
                    if in_class:  # self, bound by the call self.f(...): shown as the call sees it
                        del (args.posonlyargs or args.args)[0]
                    out.append((child.lineno, f"def f({ast.unparse(args)}): ...", signature(args)))
            visit(child, isinstance(child, ast.ClassDef))

    visit(tree, False)
    return tuple(out)


def calls_of(tree):
    """outline's calls: every call without * or ** unpacking, as (line, its arguments' text, its shape:
    (number of positional arguments, keyword names))."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args) \
                and all(k.arg for k in node.keywords):
            text = ", ".join([ast.unparse(a) for a in node.args] + [f"{k.arg}={ast.unparse(k.value)}"
                                                                     for k in node.keywords])
            out.append((node.lineno, text, (len(node.args), tuple(k.arg for k in node.keywords))))
    return tuple(sorted(out))


def signature(args):
    """The inspect.Signature of an ast.arguments (defaults stand in as 0)."""
    P, a = inspect.Parameter, args
    positional = [(x.arg, P.POSITIONAL_ONLY) for x in a.posonlyargs]
    positional += [(x.arg, P.POSITIONAL_OR_KEYWORD) for x in a.args]
    required = len(positional) - len(a.defaults)
    params = [P(n, k, default=P.empty if i < required else 0) for i, (n, k) in enumerate(positional)]
    params += [P(a.vararg.arg, P.VAR_POSITIONAL)] if a.vararg else []
    params += [P(x.arg, P.KEYWORD_ONLY, default=P.empty if d is None else 0)
               for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    params += [P(a.kwarg.arg, P.VAR_KEYWORD)] if a.kwarg else []
    return inspect.Signature(params)


def binds(sig, shape):
    """Would a call of shape (number of positional arguments, keyword names) bind to sig, or raise
    TypeError before the function runs?"""
    n, keywords = shape
    try:
        sig.bind(*range(n), **dict.fromkeys(keywords, 0))
        return True
    except TypeError:
        return False


# --- cola: real statements, against the same kind of statements after one token-level corruption

def snippet(lines, first, last):
    """Whole lines first..last (from 1), dedented, without trailing whitespace."""
    return textwrap.dedent("\n".join(lines[first - 1:last])).rstrip()


def tokens(text):
    """[(start, end, string, touchable)] of text's tokens, offsets in characters, or None if it does not
    tokenize. Touchable: a name, number, operator or string that neither is nor holds a bracket, so that
    a corruption leaves every bracket count as it was."""
    starts, at = [], 0
    for line in text.split("\n"):
        starts.append(at)
        at += len(line) + 1
    skip = {tokenize.ENCODING, tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
            tokenize.COMMENT, tokenize.ENDMARKER}
    plain = {tokenize.NAME, tokenize.NUMBER, tokenize.OP, tokenize.STRING}
    out = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type not in skip:
                touchable = t.type in plain and not set(t.string) & set("()[]{}")
                start, end = starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1]
                out.append((start, end, t.string, touchable))
    except (tokenize.TokenError, SyntaxError):
        return None
    return out


@functools.lru_cache(maxsize=None)
def separator(tok):
    """What goes between a token and its copy: nothing, unless the two would read as one token."""
    toks = tokens(tok + tok)
    return "" if toks is not None and [t[2] for t in toks] == [tok, tok] else " "


def corrupt(text, rng, block_size, tries=10):
    """(corrupted text, what was done) or None: one touchable token, never the first or the last one,
    deleted, duplicated or swapped with the next, such that the text still fits, tokenizes as exactly that
    edit of its tokens (no two read as one, as "a.b" -> "ab."), and ast.parse fails."""
    toks = tokens(text)
    inner = [i for i in range(1, len(toks) - 1) if toks[i][3]] if toks else []
    for _ in range(tries if len(inner) >= 2 else 0):
        op, i = ("delete", "duplicate", "swap")[rng.integers(3)], inner[rng.integers(len(inner))]
        s, e, tok, _ = toks[i]
        strings = [t[2] for t in toks]
        if op == "delete":  # and one space less where two would meet, or at either end of a line
            before, after = text[:s], text[e:]
            if after.startswith(" ") and (before == "" or before[-1] in " \n"):
                after = after[1:]
            elif (after == "" or after[0] == "\n") and before.endswith(" "):
                before = before.rstrip(" ")
            new, strings[i:i + 1] = before + after, []
        elif op == "duplicate":
            new, strings[i:i] = text[:e] + separator(tok) + tok + text[e:], [tok]
        else:
            if i + 1 not in inner or toks[i + 1][2] == tok:
                continue
            s2, e2, tok2, _ = toks[i + 1]
            new, strings[i:i + 2] = text[:s] + tok2 + text[e:s2] + tok + text[e2:], [tok2, tok]
        if len(new.encode()) > block_size or parses(new):
            continue
        again = tokens(new)
        if again is not None and [t[2] for t in again] == strings:
            return new, f"{op} {tok!r}"
    return None


def cola_windows(lines, stmts, rng, block_size):
    """[(first line, last line)]: non-overlapping windows of 1-3 consecutive statements of a body (drawn
    at random), from min(16, block_size // 2) to block_size bytes once dedented by their column; inside a
    statement too long for every window, its bodies are searched. Only sizes are looked at here."""
    shortest, out = min(16, block_size // 2), []

    def size(first, last, col):
        return sum(len(lines[n - 1].rstrip()) - col + 1 for n in range(first, last + 1))

    def visit(body):
        i = 0
        while i < len(body):
            for w in range(min(int(rng.integers(1, 4)), len(body) - i), 0, -1):
                if shortest <= size(body[i][0], body[i + w - 1][1], body[i][2]) <= block_size + 1:
                    out.append((body[i][0], body[i + w - 1][1]))
                    i += w
                    break
            else:
                for sub in body[i][3]:
                    visit(sub)
                i += 1

    visit(stmts)
    return out


def cola_pair(lines, window, rng, block_size):
    """(text, (corrupted text, what was done)) of a window, or None unless its text fits, parses, and
    has a corruption: the two labels are drawn from the same windows."""
    text = snippet(lines, *window)
    if not min(16, block_size // 2) <= len(text.encode()) <= block_size or not parses(text):
        return None
    bad = corrupt(text, rng, block_size)
    return (text, bad) if bad else None


def cola_split(split, block_size, quota):
    """quota // 2 pairs (positive, negative) of the same length in bytes, so that length tells nothing.
    Windows are drawn file by file (PER_FILE at most in val and test); each is kept whole (a positive)
    or corrupted (a negative), whichever completes a pair with one waiting, else either at random."""
    waiting, pairs = ({}, {}), []  # by length: the negatives, the positives without a partner yet
    for path, seed in file_order(split):
        lines, stmts, _ = outline(path)
        rng = np.random.default_rng([seed, block_size])
        windows, drawn = cola_windows(lines, stmts, rng, block_size), 0
        for i in rng.permutation(len(windows)):
            if drawn == PER_FILE.get(split) or len(pairs) == quota // 2:
                break
            made = cola_pair(lines, windows[i], rng, block_size)
            if made is None:
                continue
            (text, (bad, note)), line, drawn = made, windows[i][0], drawn + 1
            good, wrong = Example(text, 1, path, line, ""), Example(bad, 0, path, line, note)
            a, b = len(text.encode()), len(bad.encode())
            if waiting[0].get(a):
                pairs.append((good, waiting[0][a].pop()))
            elif waiting[1].get(b):
                pairs.append((waiting[1][b].pop(), wrong))
            elif rng.random() < 0.5:
                waiting[0].setdefault(b, []).append(wrong)
            else:
                waiting[1].setdefault(a, []).append(good)
        if len(pairs) == quota // 2:
            break
    return [e for pair in pairs for e in pair]  # positive, negative, positive, ...


# --- pairs: a def over a call, renamed to it, of the same file; does the call bind or raise TypeError?

def pair_width(block_size):
    """Bytes of a pairs row's def line, padded with spaces: 9/16 of the block, 36 of 64."""
    return block_size * 9 // 16


def pair_row(row, block_size):
    """A pairs row's bytes with its def line (up to the first newline) padded with spaces to pair_width,
    so that a row's length is the call's alone: the rows of pairs_split, and sample.py's input."""
    define, newline, call = row.partition(b"\n")
    return define.rstrip().ljust(pair_width(block_size), bytes([PAD])) + newline + call


def pair_text(function, call, block_size):
    """'def f(a, b=0): ...    \\nf(x, y)': a def over a call's arguments, as pair_row pads it."""
    return pair_row(f"{function[1]}\nf({call[1]})".encode(), block_size).decode()


def pairs_split(split, block_size, quota):
    """Rows of (def, call) from one file, labelled by whether the call binds to the def (1) or would raise
    TypeError (0). Per file, in rounds, a chain of its functions in a random order: between each one and
    the next, a call of the file not used before that binds to the one and not to the next, drawn at
    random among the calls that fit in a row; the chain closes on its first. Each link gives two rows,
    the call under the one (1) and under the next (0), so in a round every def is shown once with either
    label and every call is shown once with either label: neither half alone tells it. A chain that cannot
    close drops its first function; the rounds go on while two are left (PER_FILE rows a file in val
    and test)."""
    out = []
    for path, seed in file_order(split):
        _, _, (functions, calls) = outline(path)
        functions = [f for f in functions if len(f[1].encode()) <= pair_width(block_size)]  # padded, not cut
        rng, rows = np.random.default_rng([seed, block_size]), PER_FILE.get(split, quota)
        pool = collections.defaultdict(list)  # shape -> its calls unused yet, as (length, call), shortest first
        for c in sorted(calls, key=lambda c: len(c[1].encode())):
            pool[c[2]].append((len(c[1].encode()), c))
        shapes = sorted(pool)
        bound = [{s for s in shapes if binds(f[2], s)} for f in functions]  # the shapes that bind to f
        fit = block_size - pair_width(block_size) - len("\nf()")  # bytes left for a call's arguments

        def link(f, g):
            """A call binding to functions[f] and not to functions[g] that fits in a row (taken out of the
            pool), or None."""
            for i in rng.permutation(len(shapes)):
                s, cs = shapes[i], pool[shapes[i]]
                if cs and s in bound[f] and s not in bound[g] and cs[0][0] <= fit:
                    return cs.pop(int(rng.integers(bisect.bisect_right(cs, fit, key=lambda c: c[0]))))[1]
            return None

        alive = list(range(len(functions)))
        while len(out) < quota and rows >= 4 and len(alive) >= 2:
            chain, links = [], []
            for f in (alive[i] for i in rng.permutation(len(alive))):
                c = link(chain[-1], f) if chain else None
                if not chain or c:
                    chain, links = chain + [f], links + [c] * bool(chain)
                if 2 * len(chain) + 2 > min(rows, quota - len(out)):
                    break
            while len(chain) >= 2 and not (c := link(chain[-1], chain[0])):
                chain.pop()
                back = links.pop()
                bisect.insort(pool[back[2]], (len(back[1].encode()), back), key=lambda c: c[0])
            if len(chain) < 2:  # no chain closes on its first (def f(*args, **kwargs) takes every call): drop it
                alive.remove(chain[0])
                continue
            links.append(c)
            for j, (i, c) in enumerate(zip(chain, links)):
                f, g = functions[i], functions[chain[(j + 1) % len(chain)]]
                out.append(Example(pair_text(f, c, block_size), 1, path, c[0], f[0]))
                out.append(Example(pair_text(g, c, block_size), 0, path, c[0], g[0]))
            rows -= 2 * len(chain)
        if quota - len(out) < 4:
            break
    return out


def package_examples(block_size, max_per_class=None):
    """package_picks as Examples (for their files; their text is decoded for reading only)."""
    out = {}
    for split, per_label in package_picks(block_size, max_per_class).items():
        out[split] = []
        for label, (chunks, paths, offsets) in enumerate(per_label):
            for c, p, o in zip(chunks, paths, offsets):
                line = open(p, "rb").read(o).count(b"\n") + 1
                out[split].append(Example(decode(c), label, p, line, ""))
    return out


@functools.lru_cache(maxsize=16)
def glue_examples(task, block_size, max_train=None):
    """{split: tuple of Example} of a task in GLUE_TASKS, the same at every call. Every split draws on
    its own files (stdlib_split_of), holds as many examples of each label, and QUOTA of them at most;
    max_train, when given, replaces the train quota (package: max_train // 8 per label, else all)."""
    if task not in GLUE_TASKS:
        raise DataError(f"unknown task {task!r}; the tasks are {', '.join(GLUE_TASKS)}")
    if task == "package":
        per_class = max_train // len(CLASS_PACKAGES) if max_train else None
        return {s: tuple(e) for s, e in package_examples(block_size, per_class).items()}
    if block_size < 32:
        raise DataError(f"task {task} needs a --block-size of 32 at least, not {block_size}")
    build = cola_split if task == "cola" else pairs_split
    quota = dict(QUOTA, train=max_train or QUOTA["train"])
    return {s: tuple(build(s, block_size, quota[s])) for s in SPLITS}


def glue_splits(task, block_size, max_train=None):
    """{split: (x (N, block_size) int64, y (N,) int64)} of a task: glue_examples as UTF-8 bytes, clipped
    to block_size and right-padded with PAD; package gives classification_splits, the files' own bytes."""
    if task == "package":
        per_class = max_train // len(CLASS_PACKAGES) if max_train else None
        return classification_splits(block_size, per_class)
    out = {}
    for split, examples in glue_examples(task, block_size, max_train).items():
        rows = b"".join(e.text.encode()[:block_size].ljust(block_size, bytes([PAD])) for e in examples)
        x = np.frombuffer(rows, dtype=np.uint8).reshape(-1, block_size)  # (N, T)
        y = torch.tensor([e.label for e in examples], dtype=torch.int64)  # (N,)
        out[split] = (torch.from_numpy(x.astype(np.int64)), y)  # (N, T), (N,)
    return out


def glue_holdout_files():
    """Every file in the val or test split of a task (they share stdlib_split_of): the encoder must not
    pretrain on them. A superset of classification_holdout_files()."""
    return sorted(p for p, s in stdlib_split_of().items() if s != "train")


def counts(pred, y):
    """(tp, fp, tn, fn) of binary predictions against labels; 1 is the positive class."""
    pred, y = torch.as_tensor(pred).long(), torch.as_tensor(y).long()
    tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
    tn, fn = int(((pred == 0) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum())
    return tp, fp, tn, fn


def mcc(pred, y):
    """Matthews correlation: (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)), 0 when a factor is 0."""
    tp, fp, tn, fn = counts(pred, y)
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(den) if den else 0.0


def f1(pred, y):
    """F1 of the positive class: 2 tp / (2 tp + fp + fn), 0 when there is nothing to count."""
    tp, fp, _, fn = counts(pred, y)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


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
    """Labelled snippets (the package task, and the base of the others); the loss and the accuracy over
    the whole split, and the task's own metrics (`extra`). `metric` names the one a table reports."""
    metric, n_classes, extra = "acc", len(CLASS_PACKAGES), ()

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
        loss, preds = torch.zeros((), device=device), []
        for i in range(0, len(x), 256):
            xb, yb = to_device(x[i:i + 256], device), to_device(y[i:i + 256], device)
            with amp(device, self.args.dtype):
                logits, l = model.classify(xb, yb)
            loss += l.float() * len(xb)
            preds.append(logits.argmax(-1))  # (b,)
        model.train()
        pred = torch.cat(preds).cpu()  # (N,); with the loss, the evaluation's host syncs
        out = {"loss": loss.item() / len(x), "acc": (pred == y).float().mean().item()}
        return out | {name: METRICS[name](pred, y) for name in self.extra}


class ColaTask(ClassifyTask):
    """Does the snippet parse? Matthews correlation first, as CoLA."""
    metric, n_classes, extra = "mcc", 2, ("mcc",)


class PairsTask(ClassifyTask):
    """Does the call bind to the def? Accuracy first, and F1 of the calls that bind, as MRPC."""
    metric, n_classes, extra = "acc", 2, ("f1",)


METRICS = {"mcc": mcc, "f1": f1}
TASK_LABELS = {"cola": ("does not parse", "parses"), "pairs": ("raises TypeError", "binds"),
               "package": CLASS_PACKAGES}
GLUE_TASK_CLASSES = {"cola": ColaTask, "pairs": PairsTask, "package": ClassifyTask}  # the task objects
