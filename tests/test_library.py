"""triadapt as a library on models it did not write: the README's loop through capacity doublings, exact
resume through the allocator, Conv1D and half-precision bases, what inject refuses, adapter files of every
kind, the LoRA fold and the hand-written safetensors."""
import io
import json
import os
import re
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import report
import tensorfile
import triadapt
from baselines import AdaLoRALinear, IncreLoRALinear, LoRALinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_library_block():
    """The python block under "As a library" in the README, as a user copies it."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.search(r"```python\n(.*?)```", text[text.index("**As a library.**"):], re.S).group(1)


class Block(nn.Module):
    """x + v_proj(tanh(q_proj(x))): `inner` = 2 caps both adapters at rank 2, so the budget
    (r_ref per matrix) flows to the wide block, whose adapters must pass their capacity 2 r_ref = 16."""

    def __init__(self, d, inner):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, inner), nn.Linear(inner, d)

    def forward(self, x):
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


def doubling_model():
    torch.manual_seed(0)
    return nn.Sequential(Block(32, 32), Block(32, 2), Block(32, 2))


def test_the_readme_loop_keeps_every_adapter_training_through_doublings(monkeypatch):
    at_doubling = {}  # name -> its factors right after its last doubling
    original = triadapt.RankAllocator.update_and_allocate

    def spy(self, t):
        grown = original(self, t)
        for name in self.recreated:
            at_doubling[name] = (t, [getattr(self.layers[name], k).detach().clone() for k in "ABLU"])
        return grown

    monkeypatch.setattr(triadapt.RankAllocator, "update_and_allocate", spy)
    model = doubling_model()
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    ns = dict(model=model, T=250, x=x, y=y, loss_fn=F.mse_loss)
    exec(readme_library_block(), ns)
    layers, opt = ns["layers"], ns["opt"]
    assert {n: l.capacity for n, l in layers.items() if l.capacity > 16} == {"0.q_proj": 32, "0.v_proj": 32}
    assert sorted(at_doubling) == ["0.q_proj", "0.v_proj"] and all(t < 250 for t, _ in at_doubling.values())
    held = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(held) == len(trainable) == 24 and {id(p) for p in held} == {id(p) for p in trainable}
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in trainable)  # every one has Adam state
    for name, (t, before) in at_doubling.items():
        layer = layers[name]
        r = layer.rank
        now = [layer.A[:r], layer.B[:, :r], layer.L[:r, :r], layer.U[:r, :r]]
        for key, a, b in zip("ABLU", before, now):
            assert not torch.equal(a[:b.shape[0], :b.shape[1]], b), (name, key)  # it trained after step t
        assert layer.A.grad is None  # zero_grad reaches the new tensors


def train_steps(model, layers, opt, allocator, x, y, steps):
    for t in steps:
        loss = F.mse_loss(model(x), y) + 0.1 * triadapt.orthogonal_penalty(layers)
        loss.backward()
        opt.step()
        allocator.update_and_allocate(t)
        opt.zero_grad()
    return loss.item()


def setup(T):
    model = doubling_model()
    layers = triadapt.inject(model, ["q_proj", "v_proj"], rank=1, ref_rank=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    allocator = triadapt.RankAllocator(layers, total_steps=T, warmup=100, interval=10, optimizer=opt)
    return model, layers, opt, allocator


def test_resume_through_the_allocator_across_a_doubling_is_bit_exact(tmp_path):
    x, y = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)), torch.randn(64, 32)
    straight = setup(200)
    train_steps(*straight, x, y, range(1, 201))
    first = setup(200)
    train_steps(*first, x, y, range(1, 146))
    model, layers, opt, allocator = first
    assert any(l.capacity == 32 for l in layers.values())  # it stops after a doubling
    with open(tmp_path / "ckpt.pt", "wb") as f:
        adapters.save_file({"model": model.state_dict(), "opt": opt.state_dict(),
                            "allocator": allocator.state_dict(), "rng": torch.get_rng_state()}, f)
    ckpt = adapters.load_file(tmp_path / "ckpt.pt")  # weights_only
    model, layers, opt, allocator = resumed = setup(200)
    allocator.load_state_dict(ckpt["allocator"])  # replays the growths: the optimizer holds the new tensors
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    train_steps(*resumed, x, y, range(146, 201))
    for (name, a), b in zip(straight[0].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- other models

class Conv1D(nn.Module):
    """GPT-2's layer: y = x @ W + b with W stored (in, out), and its width in `nf`."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("cls, kw", [(triadapt.TriAdaptLinear, dict(rank=2, ref_rank=2)),
                                     (LoRALinear, dict(rank=3)), (AdaLoRALinear, dict(rank=3)),
                                     (IncreLoRALinear, dict(rank=2, ref_rank=2, core="diagonal", advance=1))])
def test_a_conv1d_base_is_adapted_fan_in_fan_out(cls, kw):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 7)).double()  # d_in 7, d_out 5
    (layer,) = triadapt.inject(model, ["0"], layer_cls=cls, **kw).values()
    assert layer.fan_in_fan_out and (layer.d_in, layer.d_out) == (7, 5)
    with torch.no_grad():
        for p in layer.parameters(recurse=False):
            p.add_(torch.randn_like(p))
        if hasattr(layer, "E"):
            layer.E.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    x = torch.randn(4, 7, dtype=torch.float64)
    dW = layer.delta_weight()  # (d_out, d_in)
    assert dW.shape == (5, 7)
    expected = x @ (layer.base.weight + dW.t()) + layer.base.bias
    assert torch.allclose(layer(x), expected, atol=1e-12)
    layer.merge()
    assert torch.allclose(layer.base.weight, model[0].base.weight) and torch.allclose(layer(x), expected, atol=1e-12)
    layer.unmerge()
    lora_A, lora_B = layer.lora_factors()
    assert torch.allclose(lora_B @ lora_A, dW, atol=1e-12)


def test_a_bf16_base_gets_float32_adapters_whose_core_diagonal_moves_at_lr_2e_4():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).to(torch.bfloat16)
    layers = triadapt.inject(model, ["0", "2"], rank=4, ref_rank=4)
    layer = layers["0"]
    assert all(p.dtype == torch.float32 for p in layer.parameters(recurse=False))
    assert layer.base.weight.dtype == torch.bfloat16
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    x, y = torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(32, 16, dtype=torch.bfloat16)
    diag = torch.diagonal(layer.L[:4, :4]).clone()
    for _ in range(3):
        out = model(x)
        assert out.dtype == torch.bfloat16
        (F.mse_loss(out.float(), y.float()) + 0.1 * triadapt.orthogonal_penalty(layers)).backward()
        opt.step()
        opt.zero_grad()
    moved = torch.diagonal(layer.L[:4, :4]) - diag
    assert diag.eq(1).all() and moved.abs().min() > 0  # every entry moved: about 3 lr steps of size 2e-4
    assert moved.abs().max() < 1e-3
    # the reason: in bf16 the same steps round away (1 + 2e-4 is 1 there)
    assert torch.equal(torch.tensor(1.0, dtype=torch.bfloat16) + 6e-4, torch.tensor(1.0, dtype=torch.bfloat16))


def test_orthogonal_penalty_groups_by_dtype():
    torch.manual_seed(0)
    a = triadapt.inject(nn.Sequential(nn.Linear(6, 6)), ["0"], rank=2, ref_rank=2)["0"]
    b = triadapt.inject(nn.Sequential(nn.Linear(6, 6)).double(), ["0"], rank=2, ref_rank=2)["0"]
    assert a.A.shape == b.A.shape and a.A.dtype != b.A.dtype
    both = triadapt.orthogonal_penalty([a, b])
    alone = (triadapt.orthogonal_penalty([a]).double() + triadapt.orthogonal_penalty([b])) / 2
    assert torch.allclose(both.double(), alone)


def test_inject_refuses_the_out_proj_of_multihead_attention():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match=r"^attn.out_proj cannot be adapted: its parent nn.MultiheadAttention "
                                         r"reads its weight directly"):
        triadapt.inject(model, ["out_proj"])
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


class LlamaBlock(nn.Module):
    """A LLaMA-style block: RMS-normed attention and a SwiGLU MLP, linears without biases."""

    def __init__(self, d=16, n_head=2, hidden=24):
        super().__init__()
        self.n_head = n_head
        for name, shape in (("q_proj", (d, d)), ("k_proj", (d, d)), ("v_proj", (d, d)), ("o_proj", (d, d)),
                            ("gate_proj", (d, hidden)), ("up_proj", (d, hidden)), ("down_proj", (hidden, d))):
            setattr(self, name, nn.Linear(*shape, bias=False))

    def forward(self, x):
        B, T, C = x.shape
        h = F.rms_norm(x, (C,))
        q, k, v = (p(h).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        h = F.rms_norm(x, (C,))
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def test_a_llama_block_trains_grows_and_merges():
    torch.manual_seed(0)
    model = nn.Sequential(LlamaBlock(), LlamaBlock())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers = triadapt.inject(model, targets, rank=1, ref_rank=2)
    assert len(layers) == 14 and all(l.base.bias is None for l in layers.values())
    assert triadapt.count_trainable(model) == 14 * 1 * 1 * 2 + sum(l.d_in + l.d_out for l in layers.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = triadapt.RankAllocator(layers, total_steps=30, warmup=5, interval=5, optimizer=opt)
    x, y = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    train_steps(model, layers, opt, allocator, x, y, range(1, 31))
    assert allocator.total_rank == 28 and allocator.events
    with torch.no_grad():
        before = model(x)
        adapters.merge_adapters(model)
        assert not adapters.adapter_layers(model) and torch.allclose(model(x), before, atol=1e-5)


# ----------------------------------------------------------------------------- files and the fold

def trained_layers(cls, **kw):
    """One adapter of each kind on a float64 Linear(7, 5), with every trainable entry moved off its init."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5)).double()
    (layer,) = triadapt.inject(model, ["0"], layer_cls=cls, **kw).values()
    if hasattr(layer, "grow") and cls is not LoRALinear:
        layer.grow(2)
    with torch.no_grad():
        for p in layer.parameters(recurse=False):
            p.add_(torch.randn_like(p) * 0.5)
        if hasattr(layer, "E"):
            layer.set_live(torch.tensor([True, False, True]))
        if hasattr(layer, "L_mask"):  # masked entries back to 0, as training leaves them
            r = layer.rank + getattr(layer, "advance", 0)
            for t in (layer.A[r:], layer.B[:, r:]):
                t.zero_()
    return model, layer


KINDS = [("triadapt", triadapt.TriAdaptLinear, dict(rank=1, ref_rank=2)), ("lora", LoRALinear, dict(rank=3)),
         ("adalora", AdaLoRALinear, dict(rank=3)),
         ("increlora", IncreLoRALinear, dict(rank=1, ref_rank=2, core="diagonal", advance=1))]


@pytest.mark.parametrize("kind, cls, kw", KINDS, ids=[k[0] for k in KINDS])
def test_every_kind_folds_to_lora_and_round_trips_its_file(kind, cls, kw, tmp_path):
    model, layer = trained_layers(cls, **kw)
    lora_A, lora_B = layer.lora_factors()
    assert torch.allclose(lora_B @ lora_A, layer.delta_weight(), atol=1e-12)
    rank = {"triadapt": 3, "lora": 3, "adalora": 2, "increlora": 4}[kind]  # increlora: 3 + the advance row
    assert lora_A.shape == (rank, 7) and lora_B.shape == (5, rank)
    state = adapters.adapter_state({"0": layer})
    assert state["0"]["kind"] == kind and "alpha" in state["0"] and "fan_in_fan_out" in state["0"]
    with open(tmp_path / "a.pt", "wb") as f:
        adapters.save_file({"format": adapters.FORMAT, "layers": state}, f)
    loaded = adapters.load_file(tmp_path / "a.pt")["layers"]
    fresh = nn.Sequential(nn.Linear(7, 5)).double()
    fresh.load_state_dict({"0.weight": layer.base.weight, "0.bias": layer.base.bias})
    (again,) = adapters.load_adapter(fresh, loaded).values()
    x = torch.randn(3, 7, dtype=torch.float64)
    assert type(again) is cls and torch.equal(again(x), layer(x))


def test_an_entry_never_falls_back_to_a_default():
    _, layer = trained_layers(triadapt.TriAdaptLinear, rank=1, ref_rank=2)
    state = adapters.adapter_state({"0": layer})
    del state["0"]["alpha"]
    with pytest.raises(adapters.AdapterFileError, match=r"^0: the triadapt entry records no 'alpha'$"):
        adapters.load_adapter(nn.Sequential(nn.Linear(7, 5)).double(), state)
    state["0"]["kind"] = None
    with pytest.raises(adapters.AdapterFileError, match="unknown adapter kind None"):
        adapters.load_adapter(nn.Sequential(nn.Linear(7, 5)).double(), state)


class Payload:
    """Unpickling it creates a file: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def code_running_file(path, marker):
    torch.save({"format": adapters.FORMAT, "model": Payload(str(marker))}, path)
    return path


def test_load_file_refuses_a_file_that_would_run_code(tmp_path):
    path = code_running_file(tmp_path / "evil.pt", tmp_path / "ran")
    with pytest.raises(adapters.AdapterFileError, match="refused: it holds objects that would run code"):
        adapters.load_file(path, "adapter")
    assert not (tmp_path / "ran").exists()


def test_the_peft_export_names_shapes_and_ranks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 6))
    layers = triadapt.inject(model, ["0", "1"], rank=2, ref_rank=2)
    fold = adapters.lora_fold(layers)
    config, tensors = adapters.peft_config(fold), adapters.peft_tensors(fold)
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 2
    assert config["rank_pattern"] == config["alpha_pattern"] == {"0": 2, "1": 2}
    assert config["target_modules"] == ["0", "1"] and config["bias"] == "none" and config["lora_dropout"] == 0.0
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.0.lora_A.weight": (2, 6), "base_model.model.0.lora_B.weight": (4, 2),
        "base_model.model.1.lora_A.weight": (2, 4), "base_model.model.1.lora_B.weight": (6, 2)}
    assert all(t.dtype == torch.float32 for t in tensors.values())


# ----------------------------------------------------------------------------- safetensors by hand

def test_the_safetensors_writer_writes_the_bytes_worked_out_by_hand(tmp_path):
    buf = io.BytesIO()
    tensorfile.write(buf, {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[7]], dtype=torch.int16)},
                     {"k": "v"})
    header = (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              b'"b":{"dtype":"I16","shape":[1,1],"data_offsets":[8,10]},"__metadata__":{"k":"v"}}')
    assert len(header) == 54 + 56 + 25  # 135, padded with one space to 136, a multiple of 8
    expected = (struct.pack("<Q", 136) + header + b" "
                + bytes([0, 0, 0x80, 0x3F]) + bytes([0, 0, 0, 0xC0])  # 1.0 and -2.0, little-endian float32
                + bytes([7, 0]))                                          # 7 as little-endian int16
    assert buf.getvalue() == expected
    (tmp_path / "x.safetensors").write_bytes(expected)
    tensors, metadata = tensorfile.read(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"} and torch.equal(tensors["a"], torch.tensor([1.0, -2.0]))
    assert tensors["b"].dtype == torch.int16 and tensors["b"].tolist() == [[7]]


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00", "shorter than 8 bytes"),
    (struct.pack("<Q", 10 ** 9) + b"{}", "a header of 1000000000 bytes"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", 8) + b'{"a":1} ', "malformed header entry"),
    (struct.pack("<Q", 56) + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  ' + b"\0" * 4,
     "do not fit"),
])
def test_the_safetensors_reader_refuses_a_malformed_file_in_one_line(tmp_path, data, message):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(tensorfile.TensorFileError, match=message) as e:
        tensorfile.read(tmp_path / "bad")
    assert "\n" not in str(e.value)


def test_report_writes_the_peft_folder(tmp_path):
    torch.manual_seed(0)
    layers = triadapt.inject(nn.Sequential(nn.Linear(6, 4)), ["0"], rank=2, ref_rank=2)
    fold = adapters.lora_fold(layers)
    report.write_peft_lora(tmp_path / "out", adapters.peft_config(fold), adapters.peft_tensors(fold))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    tensors, _ = tensorfile.read(tmp_path / "out" / "adapter_model.safetensors")
    assert config["rank_pattern"] == {"0": 2}
    A, B = tensors["base_model.model.0.lora_A.weight"], tensors["base_model.model.0.lora_B.weight"]
    assert torch.allclose(B @ A, layers["0"].delta_weight(), atol=1e-7)


# ----------------------------------------------------------------------------- every entry point refuses

def call_main(module, argv, capsys):
    code = module.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("entry", ["sample --run", "sample --merged", "train --init-from", "train --resume"])
def test_every_file_reading_entry_point_refuses_a_code_running_file(entry, tmp_path, capsys):
    import sample
    import train

    marker, out = tmp_path / "ran", tmp_path / "out"
    evil = code_running_file(tmp_path / "evil.pt", marker)
    if entry == "sample --run":
        (tmp_path / "run").mkdir()
        os.replace(evil, tmp_path / "run" / "adapter.pt")
        code, err = call_main(sample, ["--run", tmp_path / "run"], capsys)
    elif entry == "sample --merged":
        code, err = call_main(sample, ["--merged", evil], capsys)
    elif entry == "train --init-from":
        code, err = call_main(train, ["--init-from", evil, "--out-dir", out], capsys)
    else:
        (out / "linear").mkdir(parents=True)
        os.replace(evil, out / "linear" / "ckpt.pt")
        code, err = call_main(train, ["--resume", "--out-dir", out], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "would run code" in err and not marker.exists()
    assert not out.exists() or sorted(os.listdir(out)) == ["linear"]  # nothing written
