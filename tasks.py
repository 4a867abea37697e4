"""
What a run fine-tunes on: the language-modelling tasks and a small GLUE cut from the standard library,
and the task objects the training loop talks to.

  lm       next-byte prediction on the fine-tuning corpus (data.py); with --arch encoder, masked-byte
           prediction instead (BERT's: 15% of positions, 80/10/10 replacement). Loss only.
               python train.py
               python train.py --arch encoder --task lm
  cola     acceptability, as CoLA: does this snippet of Python parse? Real statements (1 to 3 of one
           body) against the same kind after one token-level corruption (a token deleted, duplicated or
           swapped with the next, brackets left alone). Matthews correlation.
               python train.py --arch encoder --task cola
  pairs    pair matching, as MRPC and QNLI: a def of a file over the arguments of a call of the same
           file; does the call bind to it, or raise TypeError? Accuracy and F1.
               python train.py --arch encoder --task pairs
  package  which of 8 standard-library packages (data.CLASS_PACKAGES) a snippet of a file's bytes comes
           from. Accuracy.
               python train.py --arch encoder --task package

cola, pairs and package (GLUE_TASKS, glue_splits) are rows of block_size bytes, right-padded with
spaces (PAD), with as many rows of each label in every split, drawn file by file the same way every
time. They share one split of the files (data.stdlib_split_of): no file is in two splits, and the
encoder pretrains on none of their val and test files (data.glue_holdout_files). All three are
learned by fine-tuning; only package told the methods apart when measured (README), so the
benchmark's average is over package alone, and cola and pairs stay as tasks.

read_corpora reads and checks what a run trains on: the base corpus, and the fine-tuning corpus or
a task's splits. The task objects (LMTask, MLMTask, ClassifyTask and its ColaTask and PairsTask, by
name in GLUE_TASK_CLASSES) are what the training loop talks to: a batch drawn on the CPU, the number
of targets in a slice of it (its weight in the batch's mean loss), the loss of a model on it, and an
evaluation on a split.
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
import math
import os
import sysconfig
import textwrap
import tokenize
import warnings

import numpy as np
import torch

import bpe
import data
import gpt2


# ----------------------------------------------------------------------------- what a run trains on

def tokenizer(init_from):
    """GPT-2's BPE when the base is a GPT-2 folder (bpe.py), else None: the tokens are bytes."""
    return bpe.BPETokenizer.from_folder(init_from) if gpt2.is_folder(init_from) else None


def encode(text, tok=None):
    return data.encode(text) if tok is None else tok.encode(text)


def decode(ids, tok=None):
    return data.decode(ids) if tok is None else tok.decode([int(i) for i in ids])


def read_corpora(d, arch):
    """What a run trains on, read and checked before anything is written: (base, fine-tuning), where
    base is (text, source, cache name) and fine-tuning the same, or the classification splits.
    d: settings.DataSettings (task, block_size, and the --data and --base-data files, or None)."""
    holdout = data.glue_holdout_files() if arch == "encoder" else ()  # one base for every task
    given = read_checked(d.data, d.block_size) if d.data is not None else None  # read even if unused
    if d.base_data is not None:
        base = (read_checked(d.base_data, d.block_size), d.base_data, "base-file")
    else:
        text, src = data.base_corpus(exclude=holdout)
        data.check_length(text, d.block_size, "the standard library's sources")
        base = (text, src, ("encoder-" if holdout else "") + "base")
    if d.task in GLUE_TASKS:
        splits = glue_splits(d.task, d.block_size)
        empty = [s for s, (x, _) in splits.items() if len(x) == 0]
        if empty:
            raise data.DataError(f"--block-size {d.block_size} leaves no {d.task} example "
                                 f"in the {empty[0]} split")
        return base, splits
    if given is not None:
        return base, (given, d.data, "finetune-file")
    text, src = data.finetune_corpus()
    data.check_length(text, d.block_size, f"the fine-tuning corpus ({src})")
    return base, (text, src, "finetune")


def read_checked(path, block_size):
    text = data.read_text_file(path)
    data.check_length(text, block_size, f"data file {path}")
    return text


# ----------------------------------------------------------------------------- the small GLUE

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
(cola) or the call (pairs) starts. note: cola, the corruption of a negative ("" for a
positive); pairs, the line of the def shown."""


@functools.lru_cache(maxsize=16)
def glue_examples(task, block_size, max_train=None):
    """{split: tuple of Example} of cola or pairs, the same at every call. Every split draws on its own
    files (stdlib_split_of), holds as many examples of each label, and QUOTA of them at most; max_train,
    when given, replaces the train quota. package has no Examples: glue_splits takes its rows as bytes."""
    if task not in GLUE_TASKS:
        raise data.DataError(f"unknown task {task!r}; the tasks are {', '.join(GLUE_TASKS)}")
    if task == "package":
        raise data.DataError("task package has no Examples: its rows are its files' bytes (package_picks)")
    if block_size < 32:
        raise data.DataError(f"task {task} needs a --block-size of 32 at least, not {block_size}")
    build = cola_split if task == "cola" else pairs_split
    quota = dict(QUOTA, train=max_train or QUOTA["train"])
    return {s: tuple(build(s, block_size, quota[s])) for s in data.SPLITS}


def glue_splits(task, block_size, max_train=None):
    """{split: (x (N, block_size) int64, y (N,) int64)} of a task: glue_examples as UTF-8 bytes, clipped
    to block_size and right-padded with PAD; package gives classification_splits, the files' own bytes."""
    if task == "package":
        per_class = max_train // len(data.CLASS_PACKAGES) if max_train else None
        return classification_splits(block_size, per_class)
    out = {}
    for split, examples in glue_examples(task, block_size, max_train).items():
        rows = b"".join(e.text.encode()[:block_size].ljust(block_size, bytes([PAD])) for e in examples)
        x = np.frombuffer(rows, dtype=np.uint8).reshape(-1, block_size)  # (N, T)
        y = torch.tensor([e.label for e in examples], dtype=torch.int64)  # (N,)
        out[split] = (torch.from_numpy(x.astype(np.int64)), y)  # (N, T), (N,)
    return out


# --- package: which of the CLASS_PACKAGES a snippet of a file's bytes comes from

def classification_files():
    """{package: sorted files} for the CLASS_PACKAGES, and each file's split (stdlib_split_of)."""
    root = sysconfig.get_paths()["stdlib"]
    shared = data.stdlib_split_of()
    files = {pkg: [p for p in data.stdlib_sources() if os.path.relpath(p, root).split(os.sep)[0] == pkg]
             for pkg in data.CLASS_PACKAGES}
    for pkg, paths in files.items():
        if len(paths) < 3:
            raise data.DataError(f"package {pkg} has {len(paths)} source files here; "
                                 f"the task needs 3 to split by file")
        if all(shared[p] != "train" for p in paths):
            raise data.DataError(f"package {pkg}: no file left for the train split")
    return files, {p: shared[p] for paths in files.values() for p in paths}


def package_picks(block_size, max_per_class=None):
    """{split: [per label: (snippets (n, block_size) uint8, file of each, byte offset of each)]}: the
    files' non-overlapping snippets, as many per label as the smallest label has in that split."""
    files, split_of = classification_files()
    out = {}
    for split in data.SPLITS:
        per_label = []
        for pkg in data.CLASS_PACKAGES:
            chunks, where = [], []
            for p in files[pkg]:
                if split_of[p] != split:
                    continue
                raw = np.frombuffer(open(p, "rb").read(), dtype=np.uint8)
                n = len(raw) // block_size
                chunks.append(raw[:n * block_size].reshape(n, block_size))
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
        y = torch.arange(len(data.CLASS_PACKAGES)).repeat_interleave(len(per_label[0][0]))  # (N,)
        out[split] = (x, y)
    return out


# --- what cola and pairs read of a file

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
               for p, s in data.stdlib_split_of().items() if s == split}
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
                method = ([a.arg for a in positional[:1]] == ["self"]
                          and len(child.args.defaults) < len(positional))
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
        # shape -> its calls unused yet, as (length, call), shortest first
        pool = collections.defaultdict(list)
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
            if len(chain) < 2:  # no chain closes on its first (def f(*args, **kwargs) takes every call):
                alive.remove(chain[0])  # drop it
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


# ----------------------------------------------------------------------------- metrics

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


# ----------------------------------------------------------------------------- the tasks

def amp(device, dtype):
    """bf16 autocast when dtype is "bf16", else nothing: what the tasks evaluate under."""
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LMTask:
    """Next-byte prediction on a cached corpus, batches and evaluation as d (settings.DataSettings) says,
    evaluated on `device` under `dtype`; the same windows every time (a generator of its own)."""

    def __init__(self, splits, d, device, dtype):
        self.splits, self.d, self.device, self.dtype = splits, d, device, dtype

    def batch(self, split, gen):
        return data.get_batch(self.splits[split], self.d.batch_size, self.d.block_size, gen)  # CPU (B, T)

    def count(self, y):
        """Targets in y: a slice's weight in the mean loss of the whole batch."""
        return y.numel()

    def loss(self, model, x, y):
        return model(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model, split):
        model.eval()
        gen, device = torch.Generator().manual_seed(1234), self.device
        total = torch.zeros((), device=device)
        for _ in range(self.d.eval_iters):
            x, y = (data.to_device(t, device) for t in self.batch(split, gen))
            with amp(device, self.dtype):
                total += self.loss(model, x, y).float()
        model.train()
        return {"loss": total.item() / self.d.eval_iters}  # one host sync per evaluation


class MLMTask(LMTask):
    """Masked-byte prediction for the encoder: 15% of positions, BERT's 80/10/10 replacement,
    masked on the CPU before the batch's single copy to the device."""

    def batch(self, split, gen):
        x, _ = super().batch(split, gen)
        return data.mask_tokens(x, mask_id=256, generator=gen)

    def count(self, y):
        return int((y != -1).sum())  # y is on the CPU: no device sync


class ClassifyTask:
    """Labelled snippets (the package task, and the base of the others); the loss and the accuracy over
    the whole split, and the task's own metrics (`extra`). `metric` names the one a table reports."""
    metric, n_classes, extra = "acc", len(data.CLASS_PACKAGES), ()

    def __init__(self, splits, d, device, dtype):
        self.splits, self.d, self.device, self.dtype = splits, d, device, dtype

    def batch(self, split, gen):
        x, y = self.splits[split]
        ix = torch.randint(len(x), (self.d.batch_size,), generator=gen)
        return x[ix], y[ix]  # CPU (B, T), (B,)

    def count(self, y):
        return len(y)

    def loss(self, model, x, y):
        return model.classify(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model, split):
        model.eval()
        x, y = self.splits[split]
        device = self.device
        loss, preds = torch.zeros((), device=device), []
        for i in range(0, len(x), 256):
            xb, yb = data.to_device(x[i:i + 256], device), data.to_device(y[i:i + 256], device)
            with amp(device, self.dtype):
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
               "package": data.CLASS_PACKAGES}
GLUE_TASK_CLASSES = {"cola": ColaTask, "pairs": PairsTask, "package": ClassifyTask}  # the task objects
