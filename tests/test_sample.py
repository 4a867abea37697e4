"""adapter.pt, the merged export and sample.py on tiny runs: round trips, sampling, classifying, bad input."""
import contextlib
import io
import json
import os
import re

import pytest
import torch

import data
import processes
import sample
import settings
import tasks
import train
from model import GPT, GPTConfig

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--pretrain-iters", "50", "--iters", "20", "--warmup", "5", "--interval", "5",
        "--eval-interval", "20", "--eval-iters", "2", "--ref-rank", "4", "--rank-step", "2",
        "--lr-warmup", "5", "--sample-len", "0"]
TINY_CLASSIFY = ["--arch", "encoder", "--task", "package", "--n-layer", "1", "--n-embd", "32",
                 "--n-head", "2", "--block-size", "32", "--batch-size", "8", "--pretrain-iters", "20",
                 "--iters", "10",
                 "--probe-iters", "5", "--eval-iters", "2", "--warmup", "2", "--interval", "2",
                 "--eval-interval", "10", "--ref-rank", "4", "--rank-step", "2", "--schedule", "linear"]


def train_quietly(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(argv) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """One tiny base and its linear, lora, adalora, increlora and full fine-tunes: (out dir, what train.py
    printed)."""
    out = tmp_path_factory.mktemp("lm")
    schedules = "linear,lora,adalora,increlora,full"
    return out, train_quietly(TINY + ["--out-dir", str(out), "--schedule", schedules])


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls")
    train_quietly(TINY_CLASSIFY + ["--out-dir", str(out)])
    return out


def run_folder(lm, cls, name):
    return cls / name if name.startswith("package-") else lm[0] / name


def from_checkpoint(folder):
    """The fine-tuned model rebuilt the way --resume does: from ckpt.pt and the base, through train.py."""
    ckpt = torch.load(folder / "ckpt.pt", weights_only=False)
    (base_path,) = (folder.parent / "base").glob("*.pt")
    s = settings.Settings.from_public(ckpt["settings"])
    base = torch.load(base_path, weights_only=False)
    n_classes = ckpt["model_config"]["n_classes"]
    model, layers = train.build_finetune_model(s, ckpt["schedule"], base, n_classes)
    optimizer = train.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-3, 0.0)
    allocator = train.make_allocator(s, processes.Procs(), ckpt["schedule"], layers, optimizer)
    if allocator is not None:  # replays the growth (and the dropped advance blocks) before the weights
        allocator.load_state_dict(ckpt["allocator"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def logits(model, classify):
    x = torch.randint(256, (3, model.config.block_size), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        return (model.classify(x) if classify else model(x))[0]


def call(*argv):
    """sample.main on argv: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sample.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def blocks_of(entry):
    """An adapter entry's ranks as metrics.json holds them: its block sizes, else its one rank (AdaLoRA:
    its live triplets; LoRA: the rows of A)."""
    if "block_sizes" in entry:
        return entry["block_sizes"]
    if "live" in entry:
        return [int(entry["live"].sum())]
    return [entry.get("rank", len(entry["A"]))]


@pytest.mark.parametrize("name", ["linear", "lora", "adalora", "increlora", "full", "package-linear"])
def test_adapter_reproduces_the_fine_tuned_model_exactly(lm, cls, name):
    folder = run_folder(lm, cls, name)
    model, adapter = sample.load_run(str(folder))
    assert torch.equal(logits(model, "package" in name), logits(from_checkpoint(folder), "package" in name))
    (base_path,) = (folder.parent / "base").glob("*.pt")
    assert adapter["base_path"] == str(base_path)
    size, base_size = (folder / "adapter.pt").stat().st_size, base_path.stat().st_size
    if name == "full":  # every weight trained: the "adapter" is the whole state_dict
        assert adapter["layers"] == {} and adapter["model"] is not None and size > base_size / 2
    else:
        assert adapter["model"] is None and size < base_size / 3
        blocks = {n: blocks_of(e) for n, e in adapter["layers"].items()}
        m = json.loads((folder / "metrics.json").read_text())
        assert blocks == {n: m["block_sizes"].get(n, [r]) for n, r in m["rank_pattern"].items()}
    assert (adapter["cls_head"] is not None) == (name == "package-linear")


@pytest.mark.parametrize("name", ["linear", "lora", "adalora", "increlora"])
def test_export_lora_writes_peft_files_whose_product_is_each_delta_weight(lm, name, tmp_path):
    import adapters
    import tensorfile

    code, out, err = call("--run", lm[0] / name, "--export-lora", tmp_path / "lora")
    assert code == 0 and f"LoRA modules of {lm[0] / name}" in out, err
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    tensors, metadata = tensorfile.read(tmp_path / "lora" / "adapter_model.safetensors")
    model, _ = sample.load_run(str(lm[0] / name))
    layers = {n: l for n, l in adapters.adapter_layers(model).items() if l.lora_factors()[0].shape[0]}
    assert config["peft_type"] == "LORA" and metadata == {"format": "pt"} and config["fan_in_fan_out"] is False
    assert config["target_modules"] == sorted(layers) and len(tensors) == 2 * len(layers)
    assert config["rank_pattern"] == config["alpha_pattern"] and config["r"] == max(config["rank_pattern"].values())
    for module, layer in layers.items():
        A = tensors[f"base_model.model.{module}.lora_A.weight"]  # (r, d_in)
        B = tensors[f"base_model.model.{module}.lora_B.weight"]  # (d_out, r)
        assert A.dtype == B.dtype == torch.float32 and A.shape[0] == config["rank_pattern"][module]
        assert torch.allclose(B @ A, layer.delta_weight(), atol=1e-6, rtol=1e-5), module


def test_the_report_prints_the_adapter_size_next_to_the_base(lm):
    lines = [line for line in lm[1].splitlines() if line.startswith("adapter: ")]
    pattern = r"adapter\.pt [\d.]+ KB.* \(base [\d.]+ KB\); use it with: python sample\.py --run "
    assert len(lines) == 5 and all(re.search(pattern, line) for line in lines), lines
    assert "the whole fine-tuned model" in lines[-1]


def test_a_resaved_base_matches_its_fingerprint(lm, tmp_path):
    folder = lm[0] / "linear"
    (base_path,) = (lm[0] / "base").glob("*.pt")
    base = torch.load(base_path, weights_only=False)
    resaved = {"config": base["config"], "model": {k: v.clone() for k, v in base["model"].items()}}
    torch.save(resaved, tmp_path / "b.pt")  # another file, other bytes, the same weights
    model, _ = sample.load_run(str(folder), base=str(tmp_path / "b.pt"))
    assert torch.equal(logits(model, False), logits(sample.load_run(str(folder))[0], False))


@pytest.mark.parametrize("name", ["linear", "lora", "package-linear"])
def test_merged_export_is_a_plain_checkpoint_with_the_same_outputs(lm, cls, name, tmp_path):
    folder, classify = run_folder(lm, cls, name), "package" in name
    code, out, _ = call("--run", folder, "--export", tmp_path / "merged.pt")
    assert code == 0 and "merged.pt" in out
    ckpt = torch.load(tmp_path / "merged.pt", weights_only=True)  # tensors and plain values, nothing else
    plain = GPT(GPTConfig(**ckpt["config"]))
    plain.load_state_dict(ckpt["model"])  # strict: exactly the model.py keys
    expected = logits(sample.load_run(str(folder))[0], classify)
    torch.testing.assert_close(logits(plain.eval(), classify), expected, atol=1e-5, rtol=0)


def test_merged_export_fine_tunes_with_init_from(lm, tmp_path):
    out = lm[0]
    assert call("--run", out / "linear", "--export", tmp_path / "merged.pt")[0] == 0
    # topk is a schedule no other test runs: its folder is free, and the data cache is reused
    train_quietly(TINY + ["--out-dir", str(out), "--init-from", str(tmp_path / "merged.pt"),
                          "--schedule", "topk", "--iters", "2", "--warmup", "0"])
    assert sample.load_run(str(out / "topk"))[1]["base_path"] == str(tmp_path / "merged.pt")
    code, out_text, _ = call("--merged", tmp_path / "merged.pt", "--max-new-tokens", "10")
    assert code == 0 and out_text.startswith("The ")


@pytest.mark.parametrize("name", ["linear", "lora", "full"])
def test_sampling_is_deterministic_under_a_seed(lm, name, tmp_path):
    folder = lm[0] / name
    argv = ["--run", folder, "--num-samples", "2", "--max-new-tokens", "40", "--device", "cpu"]
    first, again, other = (call(*argv, "--seed", s) for s in ("1", "1", "2"))
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1] != other[1]
    samples = first[1].split("---------------\n")[:-1]
    assert len(samples) == 2 and all(s.startswith("The ") and len(s.encode()) >= 40 for s in samples)
    (tmp_path / "prompt.txt").write_text("def ")
    prompt = f"FILE:{tmp_path / 'prompt.txt'}"
    code, out, _ = call("--run", folder, "--prompt", prompt, "--max-new-tokens", "5")
    assert code == 0 and out.startswith("def ")


def test_classify_prints_a_distribution_over_every_label(cls, tmp_path):
    folder = cls / "package-linear"
    model, _ = sample.load_run(str(folder))
    probs = sample.class_probabilities(model, data.encode("import asyncio\nasync def main():"))
    assert probs.shape == (len(data.CLASS_PACKAGES),) and (probs > 0).all()
    assert abs(probs.sum().item() - 1) < 1e-6
    code, out, _ = call("--run", folder, "--text", "import asyncio")
    assert code == 0 and out.startswith("predicted: ")
    lines = out.splitlines()[1:]
    assert sorted(line.split()[0] for line in lines) == sorted(data.CLASS_PACKAGES)
    assert abs(sum(float(line.split()[1]) for line in lines) - 1) < 1e-3  # printed to 4 decimals
    (tmp_path / "snippet.py").write_bytes(b"from email import message\n")
    assert call("--run", folder, "--file", tmp_path / "snippet.py")[0] == 0


def test_a_pairs_row_is_padded_as_in_training(cls, tmp_path):
    (base_path,) = (cls / "base").glob("*.pt")
    flags = [f for f in TINY_CLASSIFY if f != "package"]
    train_quietly(flags[:flags.index("--task") + 1] + ["pairs"] + flags[flags.index("--task") + 1:]
                  + ["--init-from", str(base_path), "--out-dir", str(tmp_path)])
    model, _ = sample.load_run(str(tmp_path / "pairs-linear"))
    row = tasks.pair_text((0, "def f(a): ..."), (0, "1"), 32)  # as tasks.pairs_split writes it
    assert row == "def f(a): ...     \nf(1)"  # the def line padded to 18 bytes
    probs = sample.class_probabilities(model, data.encode(row.ljust(32)))
    code, out, _ = call("--run", tmp_path / "pairs-linear", "--text", "def f(a): ...\nf(1)")
    printed = {k.strip(): v for k, v in (line.rsplit(" ", 1) for line in out.splitlines()[1:])}
    assert code == 0 and set(printed) == {"binds", "raises TypeError"}
    assert float(printed["binds"]) == pytest.approx(probs[1].item(), abs=1e-4)


def other_base(lm, tmp_path):
    """A base checkpoint of the same shape holding other weights."""
    (base_path,) = (lm[0] / "base").glob("*.pt")
    base = torch.load(base_path, weights_only=False)
    base["model"] = {k: v + 1e-3 if k == "ln_f.weight" else v for k, v in base["model"].items()}
    torch.save(base, tmp_path / "other.pt")
    return tmp_path / "other.pt"


def linear(lm):
    return ["--run", lm[0] / "linear"]


def moved_run(lm, tmp_path, edit=None, truncate=False):
    """A copy of the linear run's adapter in a new folder, edited or cut in half."""
    folder = tmp_path / "run"
    folder.mkdir()
    source = lm[0] / "linear" / "adapter.pt"
    if truncate:
        (folder / "adapter.pt").write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    else:
        adapter = torch.load(source, weights_only=False)
        edit(adapter)
        torch.save(adapter, folder / "adapter.pt")
    return folder


BAD = [  # (what, argv from (lm, cls, tmp_path), a part of the message)
    ("missing run folder", lambda lm, cls, t: ["--run", t / "nope"], "run folder"),
    ("run without adapter", lambda lm, cls, t: ["--run", t], "holds no adapter.pt"),
    ("another base", lambda lm, cls, t: [*linear(lm), "--base", other_base(lm, t)], "is not the base of"),
    ("recorded base now another model",
     lambda lm, cls, t: ["--run", moved_run(lm, t, lambda a: a.update(base_path=str(other_base(lm, t))))],
     "is not the base of"),
    ("truncated adapter", lambda lm, cls, t: ["--run", moved_run(lm, t, truncate=True)],
     "is truncated or corrupt"),
    ("prompt longer than the context", lambda lm, cls, t: [*linear(lm), "--prompt", "x" * 33],
     "33 bytes, longer than the model's context (block_size 32)"),
    ("zero samples", lambda lm, cls, t: [*linear(lm), "--num-samples", "0"],
     "--num-samples must be positive"),
    ("negative length", lambda lm, cls, t: [*linear(lm), "--max-new-tokens", "-5"],
     "--max-new-tokens must be positive"),
    ("zero temperature", lambda lm, cls, t: [*linear(lm), "--temperature", "0"],
     "--temperature must be a positive number"),
    ("zero top-k", lambda lm, cls, t: [*linear(lm), "--top-k", "0"], "--top-k must be positive"),
    ("missing prompt file", lambda lm, cls, t: [*linear(lm), "--prompt", f"FILE:{t / 'no.txt'}"],
     "does not exist"),
    ("classifier without text", lambda lm, cls, t: ["--run", cls / "package-linear"], "is a classifier"),
    ("text to a language model", lambda lm, cls, t: [*linear(lm), "--text", "x"], "is a language model"),
    ("neither run nor merged", lambda lm, cls, t: [], "give one of --run"),
    ("export of a merged file", lambda lm, cls, t: ["--merged", t / "m.pt", "--export", t / "x.pt"],
     "--export needs --run"),
    ("lora export of a full run", lambda lm, cls, t: ["--run", lm[0] / "full", "--export-lora", t / "l"],
     "has no LoRA form"),
    ("lora export of a classifier", lambda lm, cls, t: ["--run", cls / "package-linear", "--export-lora", t / "l"],
     "has no place in a LoRA file"),
    ("lora export to a file", lambda lm, cls, t: [*linear(lm), "--export-lora", lm[0] / "linear" / "adapter.pt"],
     "is a file, not a folder"),
    ("first-format adapter",
     lambda lm, cls, t: ["--run", moved_run(lm, t, lambda a: a.update(format="triadapt-adapter-1"))],
     "of the first format (triadapt-adapter-1)"),
]


@pytest.mark.parametrize("make_argv, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(lm, cls, tmp_path, make_argv, message):
    code, out, err = call(*make_argv(lm, cls, tmp_path))
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, where no file can be created")
def test_an_export_that_cannot_be_written_is_one_line_and_exit_2(lm, tmp_path):
    code, out, err = call(*linear(lm), "--export", "/proc/x.pt")
    assert code == 2 and out == "", out
    assert err == "error: --export /proc/x.pt cannot be written: No such file or directory\n", err
    (tmp_path / "file").write_bytes(b"")
    code, _, err = call(*linear(lm), "--export", tmp_path / "file" / "x.pt")
    assert code == 2 and err.endswith("cannot be written: a part of its path is a file, not a folder\n"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_device_cuda_without_cuda(lm):
    code, _, err = call("--run", lm[0] / "linear", "--device", "cuda")
    assert code == 2 and err == "error: --device cuda, but CUDA is not available here (try --device cpu)\n"

