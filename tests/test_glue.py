"""The understanding tasks of tasks.py (cola, pairs, package): deterministic, file-disjoint, balanced,
labelled truthfully, with no shallow cue, and their metrics on examples worked by hand."""
import ast
import collections
import functools
import math
import types

import pytest
import torch

import data
import model
import tasks

B, MAX_TRAIN = 64, 1200  # the encoder's default block size; a train split small enough to build fast


@pytest.fixture(scope="module")
def examples():
    return {task: tasks.glue_examples(task, B, MAX_TRAIN) for task in ("cola", "pairs")}


@pytest.fixture(scope="module")
def picks():
    """package has no Examples: its rows are these snippets of its files (what glue_splits gives)."""
    return tasks.package_picks(B, MAX_TRAIN // len(data.CLASS_PACKAGES))


def test_mcc_and_f1_on_examples_worked_by_hand():
    # tp 1, fp 1, tn 2, fn 0: (1 * 2 - 1 * 0) / sqrt(2 * 1 * 3 * 2) = 1 / sqrt(3)
    assert tasks.mcc([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(1 / math.sqrt(3))
    assert tasks.mcc(torch.tensor([1, 0, 1, 0]), torch.tensor([1, 0, 1, 0])) == 1.0
    assert tasks.mcc([0, 1, 0, 1], [1, 0, 1, 0]) == -1.0
    assert tasks.mcc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # a constant prediction: a factor is 0
    # tp 1, fp 1, fn 1: 2 / (2 + 1 + 1)
    assert tasks.f1([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert tasks.f1(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 0])) == 1.0
    assert tasks.f1([0, 0], [0, 0]) == 0.0
    assert tasks.counts([1, 1, 0, 0, 0], [1, 0, 1, 0, 0]) == (1, 1, 2, 1)


def test_builders_are_deterministic():
    for task in ("cola", "pairs", "package"):
        first = tasks.glue_splits(task, 64, 200)
        tasks.glue_examples.cache_clear()
        tasks.outline.cache_clear()  # rebuilt from the files themselves
        second = tasks.glue_splits(task, 64, 200)
        for split in data.SPLITS:
            assert all(torch.equal(a, b) for a, b in zip(first[split], second[split]))
            assert first[split][0].dtype == torch.int64 and first[split][0].shape[1] == 64
            assert 0 <= int(first[split][0].min()) and int(first[split][0].max()) < 256  # never the MASK id


def test_sizes_and_tensors_follow_the_examples(examples, picks):
    for task in ("cola", "pairs"):
        splits = tasks.glue_splits(task, B, MAX_TRAIN)
        for split, (x, y) in splits.items():
            ex = examples[task][split]
            assert x.shape == (len(ex), B) and y.tolist() == [e.label for e in ex]
            assert len(ex) > {"train": MAX_TRAIN, "val": 250, "test": 250}[split] - 4  # pairs: 4 rows a chain
            padded = [e.text.encode().ljust(B, bytes([tasks.PAD])) for e in ex]
            assert bytes(x.flatten().tolist()) == b"".join(padded)  # every text fits: nothing clipped
    x, y = tasks.glue_splits("package", B, MAX_TRAIN)["train"]  # package: its picks, label after label
    assert torch.equal(x, tasks.classification_splits(B, MAX_TRAIN // 8)["train"][0])
    assert bytes(x.flatten().tolist()) == b"".join(c.tobytes() for c, _, _ in picks["train"])
    assert len(y) == MAX_TRAIN
    assert y.tolist() == [label for label, (chunks, _, _) in enumerate(picks["train"]) for _ in chunks]


def test_classification_splits_are_deterministic_balanced_and_file_disjoint():
    files, split_of = tasks.classification_files()
    assert list(files) == list(data.CLASS_PACKAGES) and len(files) == 8
    for pkg, paths in files.items():
        assert {split_of[p] for p in paths} == {"train", "val", "test"}, pkg
    files2, split_of2 = tasks.classification_files()
    assert split_of == split_of2
    assert {p for p, s in split_of.items() if s != "train"} <= set(data.glue_holdout_files())
    splits = tasks.classification_splits(64, max_per_class=50)
    x, y = splits["train"]
    assert x.shape == (400, 64) and torch.equal(y.bincount(), torch.full((8,), 50))
    assert torch.equal(splits["val"][0], tasks.classification_splits(64, max_per_class=50)["val"][0])


def test_splits_are_file_disjoint_and_their_files_are_held_out_of_pretraining(examples, picks):
    split_of = data.stdlib_split_of()
    holdout = set(data.glue_holdout_files())
    assert holdout == {p for p, s in split_of.items() if s != "train"}
    assert not holdout & set(data.stdlib_sources(exclude=holdout))
    files_of = {task: {split: {e.file for e in ex} for split, ex in splits.items()}
                for task, splits in examples.items()}
    files_of["package"] = {split: {p for _, paths, _ in per_label for p in paths}
                           for split, per_label in picks.items()}
    for task, files in files_of.items():
        assert not files["train"] & files["val"] and not files["train"] & files["test"]
        assert not files["val"] & files["test"]
        assert all(split_of[f] == split for split, fs in files.items() for f in fs)
        assert files["val"] | files["test"] <= holdout


def test_labels_are_balanced_in_every_split(examples, picks):
    for task, splits in examples.items():
        for split, ex in splits.items():
            per_label = collections.Counter(e.label for e in ex)
            assert len(per_label) == 2, (task, split)
            assert len(set(per_label.values())) == 1, (task, split, per_label)
    for split, per_label in picks.items():
        sizes = [len(c) for c, _, _ in per_label]
        assert len(sizes) == 8 and len(set(sizes)) == 1 and sizes[0] > 0, ("package", split, sizes)


def test_every_cola_positive_parses_and_every_negative_does_not(examples):
    for split, ex in examples["cola"].items():
        for e in ex:
            assert tasks.parses(e.text) == bool(e.label), (split, e)
            assert tasks.parses(e.text.ljust(B)) == bool(e.label)  # the padded row the model sees, too
            assert len(e.text.encode()) <= B
        x, y = tasks.glue_splits("cola", B, MAX_TRAIN)[split]
        for row, label in zip(x[:200], y[:200]):
            assert tasks.parses(data.decode(row.tolist())) == bool(label)


def test_a_cola_negative_is_one_token_edit_that_leaves_the_brackets_alone(examples):
    ops = collections.Counter()
    for e in examples["cola"]["val"]:
        if e.label == 1:
            assert e.note == ""
            continue
        op, tok = e.note.split(" ", 1)
        tok = ast.literal_eval(tok)
        ops[op] += 1
        assert not set(tok) & set("()[]{}")
        assert op != "duplicate" or tok + tasks.separator(tok) + tok in e.text
        lines = open(e.file, encoding="utf-8").read().split("\n")
        first = tasks.tokens(e.text)[0][2].split("\n")[0]
        assert lines[e.line - 1].lstrip().startswith(first)  # the first token is the snippet's own
    assert set(ops) == {"delete", "duplicate", "swap"} and min(ops.values()) > 50


def raises_type_error(text):
    """Run a pairs row as Python, defaults and arguments replaced by None (so that only the binding of the
    call to the def can fail): does the call raise TypeError?"""
    define, call = ast.parse(text).body
    a, call = define.args, call.value
    a.defaults = [ast.Constant(None) for _ in a.defaults]
    a.kw_defaults = [d and ast.Constant(None) for d in a.kw_defaults]
    call.args = [ast.Constant(None) for _ in call.args]
    for k in call.keywords:
        k.value = ast.Constant(None)
    space, code = {}, compile(ast.fix_missing_locations(ast.Expression(call)), "<row>", "eval")
    exec(compile(ast.fix_missing_locations(ast.Module([define], [])), "<row>", "exec"), space)
    try:
        eval(code, space)
        return False
    except TypeError:
        return True


def parameters(a):
    """The names of an ast.arguments' parameters, in order."""
    return [x.arg for x in a.posonlyargs + a.args + [a.vararg] + a.kwonlyargs + [a.kwarg] if x]


@functools.lru_cache(maxsize=None)
def parse_of(path):
    """({def line: its parameters' names}, {line: [the arguments' text of each call starting there]}), from
    a parse of our own."""
    tree, defs, calls = ast.parse(open(path, "rb").read()), {}, collections.defaultdict(list)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            defs[node.lineno] = parameters(node.args)
        elif isinstance(node, ast.Call):
            calls[node.lineno].append(", ".join(map(ast.unparse, node.args + node.keywords)))
    return defs, calls


def test_pairs_put_a_call_of_the_file_under_one_of_its_defs_that_it_binds_to_for_positives_only(examples):
    for split, ex in examples["pairs"].items():
        for e in ex:
            define, call = e.text.split("\n")
            assert len(define.encode()) == 36 and define.rstrip().endswith("): ...")  # padded to one width
            defs, calls = parse_of(e.file)
            names = parameters(ast.parse(e.text).body[0].args)
            assert names in (defs[e.note], defs[e.note][1:])  # a def of e.file (a method: without self) ...
            # ... over a call's arguments in e.file
            assert call.startswith("f(") and call[2:-1] in calls[e.line]
            assert raises_type_error(e.text) != e.label
        for key in ((lambda e: (e.file, e.note)), (lambda e: (e.file, e.line, e.text.split("\n")[1]))):
            shown = collections.Counter((key(e), e.label) for e in ex)  # each def, each call: as often
            assert all(shown[k, 1 - label] == n for (k, label), n in shown.items())  # with either label


def majority_by(feature, train, val):
    """Accuracy on val of predicting, for each value of feature, the label most frequent with it on train."""
    seen = collections.defaultdict(collections.Counter)
    for e in train:
        seen[feature(e)][e.label] += 1
    return sum((seen[feature(e)][1] >= seen[feature(e)][0]) == e.label for e in val) / len(val)


CUES = {
    "length": lambda e: len(e.text.encode()),
    "bracket parity": lambda e: tuple(e.text.count(c) % 2 for c in "()[]{}"),
    "brackets balanced": lambda e: all(e.text.count(a) == e.text.count(b) for a, b in ("()", "[]", "{}")),
    "last byte": lambda e: e.text.encode()[-1:],
    "first byte": lambda e: e.text.encode()[:1],
    "lines": lambda e: e.text.count("\n"),
}


@pytest.mark.parametrize("task", ["cola", "pairs"])
@pytest.mark.parametrize("cue", list(CUES))
def test_no_shallow_cue_beats_chance(examples, task, cue):
    acc = majority_by(CUES[cue], examples[task]["train"], examples[task]["val"])
    n = len(examples[task]["val"])
    assert abs(acc - 0.5) < 3 * 0.5 / math.sqrt(n), f"{task}: {cue} alone gives {acc:.3f} on val"


def test_a_task_evaluates_its_own_metric():
    torch.manual_seed(0)
    d = types.SimpleNamespace(batch_size=4)  # the part of settings.DataSettings a task batches with
    x, y = torch.randint(256, (300, 16)), torch.tensor([1, 0] * 150)  # more rows than one evaluation batch
    for name, metric, extra in (("cola", "mcc", "mcc"), ("pairs", "acc", "f1")):
        task = tasks.GLUE_TASK_CLASSES[name]({"val": (x, y)}, d, "cpu", "float32")
        assert (task.metric, task.n_classes) == (metric, 2)
        net = model.GPT(model.GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                        bidirectional=True, n_classes=2))
        result = task.evaluate(net, "val")
        with torch.no_grad():
            pred = net.classify(x)[0].argmax(-1)
        assert set(result) == {"loss", "acc", extra}
        assert result["acc"] == pytest.approx((pred == y).float().mean().item())
        assert result[extra] == pytest.approx(tasks.METRICS[extra](pred, y))
    package = tasks.GLUE_TASK_CLASSES["package"]
    assert (package.metric, package.n_classes) == ("acc", len(data.CLASS_PACKAGES))


def test_unknown_tasks_and_too_small_blocks_are_refused():
    with pytest.raises(data.DataError, match="unknown task 'classify'"):
        tasks.glue_examples("classify", B)
    with pytest.raises(data.DataError, match="package has no Examples"):
        tasks.glue_examples("package", B)  # glue_splits reads its files' bytes instead
    with pytest.raises(data.DataError, match="32 at least"):
        tasks.glue_splits("cola", 16)
