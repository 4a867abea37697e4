"""plot.py: the SVG pictures parse, hold the expected series, cells and bars, and their axes cover the
data; on hand-built metrics, on one tiny real train.py run, and through bench.py's quality picture."""
import ast
import contextlib
import io
import json
import math
import os
import random
import sys
import xml.etree.ElementTree as ET

import pytest

import bench
import plot
import train

NS = {"s": "http://www.w3.org/2000/svg"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")


def fake_metrics(schedule, seed=0, iters=600, n_layer=4, eval_interval=100, warmup=50, interval=10, k=4):
    """A metrics.json dict shaped like train.py's report(): a decaying noisy loss and, for a growing
    schedule, three matrices growing by k every allocation round until the budget (8 per matrix)."""
    rng = random.Random(seed)
    names = [f"blocks.{i}.{'attn' if m in MODULES[:4] else 'mlp'}.{m}"
             for i in range(n_layer) for m in MODULES]
    ranks, events, history = {n: 1 for n in names}, [], []
    budget = 8 * len(names)
    for t in range(1, iters + 1):
        if schedule == "linear" and t > warmup and t % interval == 0:
            for n in rng.sample(names, 3):
                step = min(k, budget - sum(ranks.values()))
                if step > 0:
                    ranks[n] += step
                    events.append([t, n, step])
        h = {"step": t, "train_loss": 2 + math.exp(-t / 150) + rng.gauss(0, 0.05), "grad_norm": 1.0,
             "total_rank": sum(ranks.values()) if schedule != "full" else 0}
        if t % eval_interval == 0 or t == iters:
            h["val_loss"] = 2.05 + math.exp(-t / 150) + rng.gauss(0, 0.01)
        history.append(h)
    blocks = {n: [1] + [e[2] for e in events if e[1] == n] for n in names} if schedule == "linear" else {}
    config = {"arch": "gpt", "task": "lm", "iters": iters, "batch_size": 32, "block_size": 128,
              "seed": 1337 + seed, "ref_rank": 8, "budget": budget, "init_rank": 1, "rank_step": 4,
              "warmup": warmup, "interval": interval, "top_k": 4, "orth_reg": 0.1, "alpha": 16.0, "lr": None}
    return {"schedule": schedule, "val_loss_before": 3.1, "val_loss": history[-1]["val_loss"],
            "test_loss": history[-1]["val_loss"] + 0.01 * seed, "peak_lr": 2e-3,
            "trainable_params": 50000 + 100 * seed if schedule != "full" else 800000,
            "rank_pattern": {} if schedule == "full" else dict(ranks), "total_rank": sum(ranks.values()),
            "block_sizes": blocks, "growth_events": events, "seconds": 1.0, "config": config,
            "history": history}


def parse(svg):
    root = ET.fromstring(svg.encode())
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("version") == "1.1"
    return root


def by_id(root, id_):
    return root.find(f".//*[@id='{id_}']")


def ticks(root, axes, kind):
    """The values of an axes group's tick labels (class xtick or ytick)."""
    return [float(t.text.replace(",", "")) for t in by_id(root, axes).findall(f"s:text[@class='{kind}']", NS)]


def covers(tick_values, data):
    return min(tick_values) <= min(data) and max(tick_values) >= max(data)


def cells(root):
    return root.findall(".//s:rect[@class='cell']", NS)


# ----------------------------------------------------------------------------- hand-built metrics

def test_nice_ticks_are_round_and_cover_the_range():
    assert plot.nice_ticks(0, 600, integer=True) == [0, 100, 200, 300, 400, 500, 600]
    assert plot.nice_ticks(0, 20, integer=True) == [0, 5, 10, 15, 20]
    assert plot.nice_ticks(1.62, 4.13) == [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    assert plot.nice_ticks(24, 192, integer=True) == [0, 50, 100, 150, 200]
    flat = plot.nice_ticks(2.0, 2.0)
    assert flat[0] < 2.0 < flat[-1]
    labels = [plot.tick_label(v, [0, 0.25]) for v in (0.0, -0.0, 0.25, 1250.0)]
    assert labels == ["0.00", "0.00", "0.25", "1,250.00"]


def test_run_report_of_a_growing_run():
    m = json.loads(json.dumps(fake_metrics("linear", k=1)))  # as loaded from metrics.json: events are lists
    svg = plot.run_report(m, "out/linear")
    root = parse(svg)
    assert len(svg) < 250_000  # the default run's size, at its most: 600 steps, 24 matrices, 55 rounds
    for series in ("train", "val", "rank"):
        assert by_id(root, series).tag == "{http://www.w3.org/2000/svg}polyline", series
    assert "linear" in root.find("s:title", NS).text and "out/linear" in svg and "EMA" in svg
    assert "r_ref 8, budget 192" in svg and "lr 0.002" in svg and "600 steps" in svg
    losses = [v for _, v in plot.train_curve(m) + plot.val_points(m)]  # the train loss as drawn: its EMA
    assert covers(ticks(root, "loss-axes", "ytick"), losses)
    assert covers(ticks(root, "loss-axes", "xtick"), [0, 600])
    assert covers(ticks(root, "rank-axes", "ytick"), [24, 192])
    columns = [0] + sorted({e[0] for e in m["growth_events"]})
    grid = cells(root)
    assert len(grid) == 24 * len(columns)
    last = {c.find("s:title", NS).text.split(",")[0]: int(c.find("s:title", NS).text.split("rank ")[1])
            for c in grid[len(columns) - 1::len(columns)]}  # the last column of every row
    assert last == {plot.short_name(n): sum(b) for n, b in m["block_sizes"].items()} and "0.q_proj" in last
    assert by_id(root, "colour-scale") is not None


@pytest.mark.parametrize("schedule", ["lora", "full"])
def test_run_without_growth_draws_no_heat_map(schedule):
    root = parse(plot.run_report(fake_metrics(schedule, iters=40, eval_interval=10)))
    assert by_id(root, "train") is not None and by_id(root, "val") is not None
    assert by_id(root, "rank") is None and by_id(root, "heatmap") is None and not cells(root)
    assert root.find(".//s:text[@class='note']", NS) is not None
    assert covers(ticks(root, "loss-axes", "xtick"), [0, 40])


def test_comparison_has_a_curve_a_band_and_an_error_bar_per_method():
    methods = {label: [fake_metrics(s, seed, iters=200, eval_interval=50) for seed in range(3)]
               for label, s in (("linear", "linear"), ("lora r_ref", "lora"), ("full", "full"))}
    root = parse(plot.comparison(methods, reference=("base (no fine-tuning)", 3.2)))
    assert len(root.findall(".//s:polyline[@class='curve']", NS)) == 3
    assert len(root.findall(".//s:polygon[@class='band']", NS)) == 3
    assert len(root.findall(".//s:rect[@class='bar']", NS)) == 3
    assert len(root.findall(".//s:g[@class='errorbar']", NS)) == 3
    params = [t.text for t in root.findall(".//s:text[@class='params']", NS)]
    assert [p.split("| ")[1] for p in params] == ["50,100 params", "50,100 params", "800,000 params"]
    vals = [v for runs in methods.values() for m in runs for _, v in plot.val_points(m)]
    assert covers(ticks(root, "val-axes", "ytick"), vals)
    tests = [m["test_loss"] for runs in methods.values() for m in runs] + [3.2]
    assert covers(ticks(root, "bars-axes", "xtick"), tests)
    assert "mean over 3 seeds, band min-max" in ET.tostring(root, "unicode")


def test_accuracy_bars_for_classify_and_no_error_bars_for_single_runs():
    methods = {s: [dict(fake_metrics(s, iters=20, eval_interval=10), test_acc=acc)]
               for s, acc in (("lora", 0.6), ("full", 0.7))}
    root = parse(plot.comparison(methods))
    assert len(root.findall(".//s:rect[@class='bar']", NS)) == 2
    assert not root.findall(".//s:g[@class='errorbar']", NS)
    assert "test accuracy, one run per method" in ET.tostring(root, "unicode")
    assert covers(ticks(root, "bars-axes", "xtick"), [0.6, 0.7])


def test_plot_imports_only_the_standard_library():
    tree = ast.parse(open(os.path.join(ROOT, "plot.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names), imported


def test_bench_quality_picture(tmp_path):
    results = {"task": "lm", "base": {"val_loss": 3.1, "test_loss": 3.2},
               "methods": {label: [fake_metrics(s, seed, iters=60, eval_interval=60) for seed in range(2)]
                           for label, s in (("linear", "linear"), ("lora r_ref", "lora"))}}
    bench.quality_picture(results, str(tmp_path / "bench_quality_lm.svg"))
    root = parse((tmp_path / "bench_quality_lm.svg").read_text())
    assert len(root.findall(".//s:polyline[@class='curve']", NS)) == 2
    assert len(root.findall(".//s:g[@class='errorbar']", NS)) == 2
    assert root.find(".//s:line[@class='reference']", NS) is not None


# ----------------------------------------------------------------------------- one tiny real run

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--pretrain-iters", "20", "--iters", "20", "--warmup", "4", "--interval", "2", "--eval-interval", "5",
        "--eval-iters", "2", "--ref-rank", "4", "--rank-step", "2", "--lr-warmup", "2", "--sample-len", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """linear, lora and full on a tiny model: pretrained 20 steps, fine-tuned 20 each (a few seconds)."""
    out, printed = tmp_path_factory.mktemp("run"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main(TINY + ["--out-dir", str(out), "--schedule", "linear,lora,full"]) == 0
    return out, printed.getvalue()


def test_every_run_writes_its_report(tiny_run):
    out, printed = tiny_run
    for schedule in ("linear", "lora", "full"):
        path = out / schedule / "report.svg"
        assert f"picture: {path}" in printed
        assert path.stat().st_size < 100_000 and not [f for f in os.listdir(out / schedule) if ".tmp" in f]
        root = parse(path.read_text())
        m = json.loads((out / schedule / "metrics.json").read_text())
        assert by_id(root, "train") is not None and by_id(root, "val") is not None
        assert covers(ticks(root, "loss-axes", "xtick"), [0, 20])
        if schedule == "linear":
            assert m["growth_events"] and by_id(root, "rank") is not None
            columns = 1 + len({e[0] for e in m["growth_events"]})
            assert len(cells(root)) == 6 * columns
            ranks = [int(c.find("s:title", NS).text.split("rank ")[1]) for c in cells(root)]
            assert ranks[columns - 1::columns] == [sum(b) for b in m["block_sizes"].values()]
        else:
            assert by_id(root, "rank") is None and not cells(root)


def test_multi_schedule_run_writes_a_comparison(tiny_run):
    out, printed = tiny_run
    assert f"picture: {out / 'comparison.svg'}" in printed
    root = parse((out / "comparison.svg").read_text())
    curves = root.findall(".//s:polyline[@class='curve']", NS)
    assert [c.get("id") for c in curves] == ["val-0-linear", "val-1-lora", "val-2-full"]
    assert len(root.findall(".//s:rect[@class='bar']", NS)) == 3
    assert "one run per method" in ET.tostring(root, "unicode")
