"""bench.py quality: an interrupted benchmark continues where it stopped; bad flags cost one line."""
import json

import pytest

import bench

TINY = ["quality", "--quick", "--methods", "lora", "--seeds", "1",
        "--train-args", "--n-layer 1 --n-embd 32 --n-head 2 --block-size 32 --batch-size 8 --eval-iters 2"]


@pytest.mark.slow
def test_quality_resumes_and_keeps_finished_runs(tmp_path, capsys):
    argv = TINY + ["--out-dir", str(tmp_path)]
    stop = argv[:-3] + [argv[-3] + " --stop-after 30"] + argv[-2:]
    with pytest.raises(SystemExit):
        bench.main(stop)  # stops in pretraining, at step 30
    assert "resume with: python bench.py quality" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(stop)  # pretraining continues to its end; the fine-tune stops at step 30
    printed = capsys.readouterr().out
    assert "pretraining: continuing from step 30" in printed and "[lora] stopped after step 30" in printed
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[lora] resumed from" in printed and "lora r_ref" in printed
    first = json.loads((tmp_path / "bench_quality_lm.json").read_text())
    assert bench.main(argv) == 0
    assert "[lora] finished earlier" in capsys.readouterr().out
    again = json.loads((tmp_path / "bench_quality_lm.json").read_text())
    assert again["methods"] == first["methods"]
    assert [h["step"] for h in first["methods"]["lora r_ref"][0]["history"]] == list(range(1, 61))


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "0"], "--seeds must be positive, got 0"),
    (["--methods", "lora,foo"], "unknown method 'foo' in --methods"),
    (["--train-args", "--nope 3"], "--train-args: unrecognized arguments: --nope 3"),
    (["--train-args", "--lr nan"], "--lr must be a finite number, got nan"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    assert bench.main(["quality", "--out-dir", str(tmp_path / "out")] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_earlier_json_is_kept_only_under_the_same_settings_and_train_defaults(tmp_path, capsys):
    path = tmp_path / "bench_quality_lm.json"
    settings = {"iters": 600, "quick": False, "train_args": [], "first_seed": 0,
                "train_defaults": {"warmup": 20, "interval": 5}}
    path.write_text(json.dumps({"settings": settings, "methods": {"linear": [{"val_loss": 1.3}]}}))
    assert bench.earlier_methods(str(path), settings) == {"linear": [{"val_loss": 1.3}]}
    # a train.py default that changed since (here the growth timing) makes the old rows incomparable
    moved = {**settings, "train_defaults": {"warmup": 50, "interval": 5}}
    assert bench.earlier_methods(str(path), moved) == {}
    assert "other settings (train_defaults)" in capsys.readouterr().out
    assert bench.earlier_methods(str(tmp_path / "none.json"), settings) == {}


def test_every_speed_variant_builds_and_the_grown_ones_reach_the_budget():
    # bench.py speed and gpu build these; a tiny shape keeps it cheap. 1 layer x 6 matrices at rank 4.
    config = bench.GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16)
    batches = bench.make_batches(config, 4, "cpu")
    names = ["lora", "tri (1 block)", "tri (grown)", "materialized", "adalora", "increlora (growing)", "full"]
    built = {v: bench.make_variant(v, config, 4, 2, "cpu", batches) for v in names}
    ranks = {v: sum(l.rank for l in layers.values()) for v, (_, layers, _) in built.items()}
    assert ranks == {"lora": 0, "tri (1 block)": 24, "tri (grown)": 24, "materialized": 24, "adalora": 36,
                     "increlora (growing)": 24, "full": 0}  # lora's layers are not TriAdapt ones: none listed
    ops = bench.op_counts({v: built[v] for v in ("lora", "tri (grown)", "full")}, batches[0])
    assert ops["full"] < ops["lora"] < ops["tri (grown), no R_orth"] < ops["tri (grown)"]


def test_the_criteria_of_a_glue_task_are_read_from_means_and_stds():
    scores = {"probe (head only)": (20.0, 1.0), "full": (35.5, 0.8), "lora r_ref": (34.0, 0.3),
              "linear": (35.7, 0.8)}
    assert bench.criteria("package", scores) == (  # 15.5 >= 15; 35.7 - 34.0 = 1.7 > 2 x 0.8
        "package: criterion 1 met (full - probe = 15.5 >= 15); "
        "criterion 2 met (linear - lora r_ref = 1.7 > 2 x 0.8)", True)
    scores |= {"full": (34.9, 0.8), "linear": (35.6, 0.9)}  # 14.9 < 15; 35.6 - 34.0 = 1.6 <= 2 x 0.9
    assert bench.criteria("package", scores) == (
        "package: criterion 1 missed (full - probe = 14.9 < 15); "
        "criterion 2 missed (linear - lora r_ref = 1.6 <= 2 x 0.9)", False)
    del scores["lora r_ref"]
    assert bench.criteria("package", scores) == ("", False)  # a method missing: no verdict


def test_the_glue_table_averages_the_suite_and_says_where_each_task_stands(tmp_path, monkeypatch):
    def runs(metric, before, *tests):  # test scores of 3 seeds; the probe ('before') of each seed
        return [{"metric": metric, f"test_{metric}": t, f"test_{metric}_before": b} for t, b in zip(tests, before)]

    for task, metric, before, scores in (
            ("package", "acc", (0.19, 0.20, 0.21), {"full": (0.35, 0.36, 0.37), "lora r_ref": (0.33, 0.33, 0.33),
                                                    "linear": (0.37, 0.37, 0.37)}),
            ("cola", "mcc", (0.0, 0.0, 0.0), {"full": (0.5, 0.6, 0.7), "lora r_ref": (0.5, 0.5, 0.5),
                                              "linear": (0.55, 0.55, 0.55)})):
        results = {"methods": {label: runs(metric, before, *t) for label, t in scores.items()}}
        (tmp_path / f"bench_quality_{task}.json").write_text(json.dumps(results))
    lines = bench.glue_table(str(tmp_path)).splitlines()
    assert lines[0].split() == ["method", "cola", "(mcc)", "package", "(acc)", "suite", "avg"]
    # the average is package's alone (cola is not in bench.SUITE); a std is over 3 seeds, x 100
    assert lines[1].split() == ["probe", "(head", "only)", "0.0", "+-", "0.0", "20.0", "+-", "1.0", "20.0"]
    assert lines[2].split() == ["full", "60.0", "+-", "10.0", "36.0", "+-", "1.0", "36.0"]
    assert lines[4].split()[-1] == "37.0"  # linear
    assert lines[5] == ("cola: criterion 1 met (full - probe = 60.0 >= 15); criterion 2 missed "
                        "(full - lora r_ref = 10.0 <= 2 x 10.0): outside the suite")
    assert lines[6] == ("package: criterion 1 met (full - probe = 16.0 >= 15); criterion 2 met "
                        "(linear - lora r_ref = 4.0 > 2 x 0.0): in the suite")
    assert len(lines) == 7
    monkeypatch.setattr(bench, "SUITE", ("cola",))  # the other way round: the verdicts say so
    lines = bench.glue_table(str(tmp_path)).splitlines()
    assert lines[2].split()[-1] == "60.0"
    assert lines[5].endswith(": in the suite, but misses one now")
    assert lines[6].endswith(": meets both now, outside the suite")


@pytest.mark.slow
def test_gpt2_step_table_has_each_method_its_ratios_and_the_closed_form_count(capsys):
    # GPT-2's layout at a tiny shape: 1 layer, C = 32; six matrices, each adapted at r = 8
    assert bench.main(["gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "300",
                       "--block-size", "16", "--steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if line.startswith("method "))
    assert header == ["method", "mode", "ms/step", "tokens/s", "TFLOP/s", "MFU", "peak", "MiB", "trainable",
                      "time/lora", "mem/lora"]
    rows = {}
    for line in lines:
        for method in ("lora", "tri (grown)", "full"):
            if line.startswith(method + " ") and line.split()[len(method.split())] == "eager":
                rows[method] = line[len(method):].split()[1:]  # ms/step ... mem/lora
    assert list(rows) == ["lora", "tri (grown)", "full"]
    assert rows["lora"][-2:] == ["1.000", "1.000"] and all(len(r) == 8 for r in rows.values())
    C, r = 32, 8
    dims = 4 * (C + C) + (C + 4 * C) + (4 * C + C)  # sum of d_in + d_out: q, k, v, out_proj, fc_in, fc_out
    # blocks 1 + 4 + 3 in every matrix: 2 sum_j k_j R_j = 2 (1 x 1 + 4 x 5 + 3 x 8) = 90 core entries
    assert int(rows["lora"][5].replace(",", "")) == r * dims == 4608
    assert int(rows["tri (grown)"][5].replace(",", "")) == r * dims + 6 * 90 == 5148
    full = bench.GPT(bench.GPTConfig(**bench.GPT2_SMALL | dict(n_layer=1, n_head=2, n_embd=32, vocab_size=300)))
    assert int(rows["full"][5].replace(",", "")) == sum(p.numel() for p in full.parameters())
    printed = "\n".join(lines)
    assert "tri (grown) / lora, eager: step time" in printed and "(target <= 1.05: " in printed
    assert "peak memory" in printed and "(target <= 1.02: " in printed
    assert "aten ops per step (eager, count_ops): lora " in printed
    assert printed.endswith("8 x 576 + 6 x 90 = 5,148")
