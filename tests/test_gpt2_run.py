"""A GPT-2 folder end to end: train.py --init-from FOLDER fine-tunes it on its BPE's tokens, sample.py samples
with that BPE and exports both ways (a GPT-2 folder, and a PEFT LoRA for GPT2LMHeadModel)."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

import adapters
import bpe
import gpt2
import sample
import tensorfile
import train
from test_gpt2 import make_gpt2_folder

pytestmark = pytest.mark.slow  # train.py end to end
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n")]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A tiny GPT-2 folder with a real byte-level BPE, and a linear fine-tune of it: (folder, out dir)."""
    tmp = tmp_path_factory.mktemp("gpt2")
    vocab = bpe.byte_level_vocab(MERGES)
    folder = tmp / "gpt2"
    make_gpt2_folder(folder, n_layer=2, n_head=2, n_embd=16, vocab_size=len(vocab), n_positions=32)
    bpe.write_files(folder, vocab, MERGES)
    text = " ".join(f"the {w} in another water on the {i}" for i in range(600) for w in ("cat", "heron"))
    (tmp / "text.txt").write_text(text)
    out = tmp / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main([str(a) for a in run_argv(folder, tmp / "text.txt", out)]) == 0
    return folder, out, printed.getvalue()


def run_argv(folder, text, out):
    return ["--init-from", folder, "--data", text, "--schedule", "linear", "--iters", "20", "--warmup", "5",
            "--interval", "5", "--eval-interval", "20", "--eval-iters", "2", "--ref-rank", "4", "--rank-step", "2",
            "--lr-warmup", "5", "--batch-size", "4", "--sample-len", "5", "--out-dir", out]


def call(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sample.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_the_run_trains_on_bpe_tokens_at_the_folders_context(gpt2_run):
    folder, out, printed = gpt2_run
    meta = json.loads((out / "data" / "finetune-file-bpe" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256 + len(MERGES) + 1
    tok = bpe.BPETokenizer.from_folder(folder)
    train_ids = np.fromfile(out / "data" / "finetune-file-bpe" / "train.bin", dtype=np.uint16)
    # "the" = t + he (merge 1: id 257), " cat" = Ġ c a t (no merge applies), " in" = Ġ + in (merge 3: 259)
    assert train_ids[:8].tolist() == tok.encode("the cat in") == [83, 257, 220, 66, 64, 83, 220, 259]
    metrics = json.loads((out / "linear" / "metrics.json").read_text())
    assert metrics["config"]["block_size"] == 32 and metrics["val_loss"] < metrics["val_loss_before"]
    assert "sample:\n" in printed


def test_sample_encodes_and_decodes_with_the_folders_bpe(gpt2_run):
    folder, out, _ = gpt2_run
    code, printed, err = call("--run", out / "linear", "--prompt", "the heron", "--max-new-tokens", "4")
    assert code == 0, err
    assert printed.startswith("the heron")


def test_export_writes_a_gpt2_folder_with_the_runs_outputs(gpt2_run, tmp_path):
    folder, out, _ = gpt2_run
    code, printed, err = call("--run", out / "linear", "--export", tmp_path / "merged")
    assert code == 0 and "GPT-2 folder" in printed, err
    merged = gpt2.from_pretrained(tmp_path / "merged").eval()
    model, _ = sample.load_run(str(out / "linear"))
    x = torch.randint(0, 264, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(x)[0], model(x)[0], atol=1e-5)
    assert (tmp_path / "merged" / "merges.txt").read_text() == (folder / "merges.txt").read_text()


def test_export_lora_stacks_q_k_v_into_c_attn(gpt2_run, tmp_path):
    _, out, _ = gpt2_run
    code, printed, err = call("--run", out / "linear", "--export-lora", tmp_path / "lora")
    assert code == 0, err
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    tensors, _ = tensorfile.read(tmp_path / "lora" / "adapter_model.safetensors")
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    model, _ = sample.load_run(str(out / "linear"))
    layers = adapters.adapter_layers(model)
    for i in range(2):
        A = tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight"]
        B = tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"]
        fused = torch.cat([layers[f"blocks.{i}.attn.{p}_proj"].delta_weight() for p in "qkv"])  # (3C, C)
        ranks = sum(layers[f"blocks.{i}.attn.{p}_proj"].rank for p in "qkv")
        assert A.shape == (ranks, 16) and B.shape == (48, ranks)
        assert config["rank_pattern"][f"transformer.h.{i}.attn.c_attn"] == ranks
        assert torch.allclose(B @ A, fused, atol=1e-6)


def folder_without(tmp_path, name):
    vocab = bpe.byte_level_vocab(MERGES)
    make_gpt2_folder(tmp_path / "g", vocab_size=len(vocab), n_positions=16)
    bpe.write_files(tmp_path / "g", vocab, MERGES)
    if name:
        (tmp_path / "g" / name).unlink()
    return tmp_path / "g"


@pytest.mark.parametrize("missing, extra, message", [
    ("vocab.json", [], "vocab.json"),
    ("config.json", [], "config.json"),
    (None, ["--block-size", "64"], "--block-size 64 exceeds the context"),
    (None, ["--n-layer", "3"], "--n-layer 3 contradicts"),
    (None, ["--arch", "encoder"], "it fine-tunes --arch gpt --task lm"),
    ("model.safetensors", [], "model.safetensors"),
])
def test_a_bad_gpt2_folder_is_one_line_and_exit_2(tmp_path, capsys, missing, extra, message):
    folder = folder_without(tmp_path, missing)
    code = train.main([str(a) for a in ["--init-from", folder, "--out-dir", tmp_path / "out", "--iters", "4",
                                         "--warmup", "1", *extra]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_stopped_gpt2_run_resumes_to_the_same_adapter(gpt2_run, tmp_path):
    folder, out, _ = gpt2_run
    argv = [str(a) for a in run_argv(folder, out.parent / "text.txt", tmp_path / "out")]
    with contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as stopped:  # --stop-after ends the process, as an interrupt would
            train.main(argv + ["--stop-after", "12"])
        assert stopped.value.code == 0
        assert train.main(argv + ["--resume"]) == 0
    a = adapters.load_file(out / "linear" / "adapter.pt")["layers"]
    b = adapters.load_file(tmp_path / "out" / "linear" / "adapter.pt")["layers"]
    for name in a:
        for key in ("A", "B", "L", "U"):
            assert torch.equal(a[name][key], b[name][key]), (name, key)
