"""gpt2.py: a tiny GPT-2 folder written here in GPT-2's own layout loads into model.py's GPT with the
logits of a literal GPT-2 forward, writes back bit for bit, refuses bad input in one line, and the
LoRA factors of q, k, v stack into c_attn's fold."""
import json
import math
import os

import pytest
import torch

import gpt2
import tensorfile
from gpt2 import GPT2Error
from model import MLP, GPTConfig

ARCH_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon",
             "activation_function")


def byte_vocab():
    """GPT-2's bytes_to_unicode: every byte a printable character (written out here, not from bpe.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return {chars[b]: b for b in range(256)}


def make_gpt2_folder(path, n_layer=2, n_head=2, n_embd=8, vocab_size=256, n_positions=16, seed=0,
                     prefix=True, head=False, dtype=torch.float32, eps=1e-3, activation="gelu_new"):
    """A GPT-2 folder with random weights in GPT-2's layout, mask buffers and all; returns the tensors
    as written. The weights are large enough (std 0.5) that GELU's curve and LayerNorm's eps matter."""
    g = torch.Generator().manual_seed(seed)
    C, pre = n_embd, "transformer." if prefix else ""

    def rand(*shape, mean=0.0):
        return (mean + 0.5 * torch.randn(*shape, generator=g)).to(dtype)

    t = {pre + "wte.weight": rand(vocab_size, C), pre + "wpe.weight": rand(n_positions, C)}
    for n in range(n_layer):
        h = f"{pre}h.{n}."
        t.update({h + "ln_1.weight": rand(C, mean=1.0), h + "ln_1.bias": rand(C),
                  h + "attn.bias": torch.tril(torch.ones(1, 1, n_positions, n_positions, dtype=torch.bool)),
                  h + "attn.masked_bias": torch.tensor(-1e4),
                  h + "attn.c_attn.weight": rand(C, 3 * C), h + "attn.c_attn.bias": rand(3 * C),
                  h + "attn.c_proj.weight": rand(C, C), h + "attn.c_proj.bias": rand(C),
                  h + "ln_2.weight": rand(C, mean=1.0), h + "ln_2.bias": rand(C),
                  h + "mlp.c_fc.weight": rand(C, 4 * C), h + "mlp.c_fc.bias": rand(4 * C),
                  h + "mlp.c_proj.weight": rand(4 * C, C), h + "mlp.c_proj.bias": rand(C)})
    t.update({pre + "ln_f.weight": rand(C, mean=1.0), pre + "ln_f.bias": rand(C)})
    if head:
        t["lm_head.weight"] = t[pre + "wte.weight"].clone()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.safetensors"), "wb") as fh:
        tensorfile.write(fh, t, {"format": "pt"})
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": n_layer,
              "n_head": n_head, "n_embd": n_embd, "n_positions": n_positions, "n_ctx": n_positions,
              "vocab_size": vocab_size,
              "layer_norm_epsilon": eps, "activation_function": activation, "resid_pdrop": 0.1,
              "embd_pdrop": 0.1, "attn_pdrop": 0.1, "bos_token_id": 50256, "eos_token_id": 50256}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(byte_vocab(), f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return t


def reference_logits(t, n_layer, n_head, eps, idx):
    """GPT-2's forward written from its own tensors: Conv1D x @ W + b, c_attn split into q, k, v and heads,
    causal softmax attention, tanh GELU, LayerNorm with eps; the head is wte."""
    t = {k.removeprefix("transformer."): v.float() for k, v in t.items()}
    B, T = idx.shape

    def layer_norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

    def conv1d(x, name):
        return x @ t[name + ".weight"] + t[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = t["wte.weight"][idx] + t["wpe.weight"][:T]  # (B, T, C)
    C = x.shape[-1]
    hs = C // n_head
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for n in range(n_layer):
        h = f"h.{n}."
        q, k, v = conv1d(layer_norm(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (z.view(B, T, n_head, hs).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + conv1d(y, h + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(layer_norm(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return layer_norm(x, "ln_f") @ t["wte.weight"].T  # (B, T, V)


def test_from_pretrained_matches_a_literal_gpt2_forward(tmp_path):
    for prefix, head in ((True, True), (True, False), (False, False)):  # GPT2LMHeadModel's, its body's
        check_literal_forward(tmp_path / f"{prefix}-{head}", prefix, head)


def check_literal_forward(folder, prefix, head):
    t = make_gpt2_folder(folder, prefix=prefix, head=head)
    model = gpt2.from_pretrained(folder).eval()
    assert model.config == GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=8,
                                     gelu_approximate="tanh", ln_eps=1e-3)
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
    ref = reference_logits(t, 2, 2, 1e-3, idx)
    assert logits.dtype == torch.float32 and logits.shape == (3, 16, 256)
    assert (logits - ref).abs().max() < 1e-5
    # the check can tell: exact GELU or the default eps move the logits by far more than 1e-5
    for change in ({"gelu_approximate": "none"}, {"ln_eps": 1e-5}):
        other = gpt2.GPT(GPTConfig(**{**vars(model.config), **change}))
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (other.eval()(idx)[0] - ref).abs().max() > 1e-4


def test_write_folder_round_trips_bit_for_bit(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    t = make_gpt2_folder(src, prefix=False, head=True)
    model = gpt2.from_pretrained(src)
    gpt2.write_folder(out, model, model.config, tokenizer_from=src)
    written, metadata = tensorfile.read(out / "model.safetensors")
    assert metadata == {"format": "pt"}
    masks = (".attn.bias", ".attn.masked_bias")
    weights = {"transformer." + k: v for k, v in t.items()
               if not k.endswith(masks) and k != "lm_head.weight"}
    assert list(written) == list(weights)  # GPT2LMHeadModel's keys, the file's order, no head, no masks
    for name, w in weights.items():
        assert written[name].dtype == w.dtype and written[name].shape == w.shape, name
        assert torch.equal(written[name], w), name
    cfg, cfg_src = (json.loads((folder / "config.json").read_text()) for folder in (out, src))
    assert {k: cfg[k] for k in ARCH_KEYS} == {k: cfg_src[k] for k in ARCH_KEYS}
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["n_ctx"] == 16 and cfg["torch_dtype"] == "float32"
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert gpt2.read_config(out) == model.config  # and the folder reads back as the same model
    again = gpt2.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_float16_stays_float16_until_the_model(tmp_path):
    t = make_gpt2_folder(tmp_path / "src", dtype=torch.float16)
    config = gpt2.read_config(tmp_path / "src")
    state = gpt2.to_project_state(tensorfile.read(tmp_path / "src" / "model.safetensors")[0], config)
    assert {v.dtype for v in state.values()} == {torch.float16}
    model = gpt2.from_pretrained(tmp_path / "src")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # widened exactly
    gpt2.write_folder(tmp_path / "out", model, model.config, dtype=torch.float16)
    written, _ = tensorfile.read(tmp_path / "out" / "model.safetensors")
    for name, w in written.items():
        assert w.dtype == torch.float16 and torch.equal(w, t[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def one_line_error(fn, match):
    with pytest.raises(GPT2Error, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def edit_tensors(folder, edit):
    t, meta = tensorfile.read(folder / "model.safetensors")
    t = dict(t)
    edit(t)
    with open(folder / "model.safetensors", "wb") as fh:
        tensorfile.write(fh, t, meta)


def edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_bad_folders_raise_one_line(tmp_path):
    make_gpt2_folder(tmp_path)
    load = lambda: gpt2.from_pretrained(tmp_path)  # noqa: E731

    edit_tensors(tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    msg = one_line_error(load, r"lacks transformer\.h\.1\.mlp\.c_fc\.bias \(expected shape \(32,\)\)")
    assert msg.startswith(str(tmp_path / "model.safetensors"))

    make_gpt2_folder(tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(8)}))
    one_line_error(load, r"unexpected tensor transformer\.h\.2\.ln_1\.weight of shape \(8,\)")

    make_gpt2_folder(tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.ones(8, 16)}))
    one_line_error(load, r"transformer\.h\.0\.attn\.c_attn\.weight has shape \(8, 16\), expected \(8, 24\)")

    make_gpt2_folder(tmp_path, head=True)
    edit_tensors(tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros(256, 8)}))
    one_line_error(load, r"lm_head\.weight differs from wte\.weight")

    make_gpt2_folder(tmp_path, vocab_size=300)  # config.json says 300, the file's wte agrees: fine
    edit_config(tmp_path, lambda c: c.update(vocab_size=256))
    one_line_error(load, r"wte\.weight has shape \(300, 8\), expected \(256, 8\)")

    make_gpt2_folder(tmp_path, activation="relu")
    one_line_error(load, r"activation_function 'relu' is not one of gelu_new")

    make_gpt2_folder(tmp_path)
    edit_config(tmp_path, lambda c: c.pop("layer_norm_epsilon"))
    one_line_error(load, r"config\.json lacks 'layer_norm_epsilon'")

    make_gpt2_folder(tmp_path)
    edit_config(tmp_path, lambda c: c.update(n_inner=16))
    one_line_error(load, r"n_inner 16 is not a GPT-2 layout")

    os.remove(tmp_path / "config.json")
    one_line_error(load, f"{tmp_path / 'config.json'} does not exist")
    one_line_error(lambda: gpt2.from_pretrained(tmp_path / "nowhere"), "is not a folder")

    make_gpt2_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4)
    one_line_error(load, r"is not a safetensors file")


def test_write_folder_refuses_what_gpt2_cannot_hold(tmp_path):
    torch.manual_seed(0)
    for kw, match in (({"bidirectional": True}, "bidirectional"), ({"n_classes": 2}, "classifier")):
        config = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=8, **kw)
        one_line_error(lambda: gpt2.write_folder(tmp_path / "out", gpt2.GPT(config), config), match)
    config = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=8)
    state = gpt2.GPT(config).state_dict()
    state["blocks.0.attn.q_proj.base.weight"] = state.pop("blocks.0.attn.q_proj.weight")  # unmerged adapter
    out = tmp_path / "out"
    one_line_error(lambda: gpt2.write_folder(out, state, config), r"lacks blocks\.0\.attn\.q_proj\.weight")
    one_line_error(lambda: gpt2.write_folder(out, gpt2.GPT(config), config, tokenizer_from=tmp_path),
                   r"vocab\.json does not exist")
    assert not os.path.exists(tmp_path / "out")  # nothing written before everything was checked


def test_gpt2_module_names():
    assert gpt2.gpt2_module("blocks.3.attn.q_proj") == ("transformer.h.3.attn.c_attn", 0)
    assert gpt2.gpt2_module("blocks.3.attn.k_proj") == ("transformer.h.3.attn.c_attn", 1)
    assert gpt2.gpt2_module("blocks.3.attn.v_proj") == ("transformer.h.3.attn.c_attn", 2)
    assert gpt2.gpt2_module("blocks.3.attn.out_proj") == ("transformer.h.3.attn.c_proj", None)
    assert gpt2.gpt2_module("blocks.3.mlp.fc_in") == ("transformer.h.3.mlp.c_fc", None)
    assert gpt2.gpt2_module("blocks.12.mlp.fc_out") == ("transformer.h.12.mlp.c_proj", None)
    one_line_error(lambda: gpt2.gpt2_module("blocks.3.attn.q_proj.base"), "not one of model.py's adaptable")


def test_lora_to_gpt2_stacks_q_and_v_into_c_attn():
    g, C = torch.Generator().manual_seed(0), 8
    r_q, r_v, r_f = 3, 2, 4
    q = (torch.randn(r_q, C, generator=g), torch.randn(C, r_q, generator=g))
    v = (torch.randn(r_v, C, generator=g), torch.randn(C, r_v, generator=g))
    fc = (torch.randn(r_f, C, generator=g), torch.randn(4 * C, r_f, generator=g))
    out = gpt2.lora_to_gpt2({"blocks.1.attn.v_proj": v, "blocks.1.mlp.fc_in": fc, "blocks.1.attn.q_proj": q})
    assert list(out) == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    A, B = out["transformer.h.1.attn.c_attn"]
    assert A.shape == (r_q + r_v, C) and B.shape == (3 * C, r_q + r_v)
    fused = torch.cat([q[1] @ q[0], torch.zeros(C, C), v[1] @ v[0]])  # (3C, C): [dW_q; 0; dW_v]
    assert torch.allclose(B @ A, fused, atol=1e-6, rtol=0)
    assert torch.equal(B[C:2 * C], torch.zeros(C, r_q + r_v))  # k's rows: nothing
    assert torch.equal(A, torch.cat([q[0], v[0]]))
    assert torch.equal(B[:C, :r_q], q[1]) and torch.equal(B[2 * C:, r_q:], v[1])
    assert out["transformer.h.1.mlp.c_fc"][0] is fc[0] and out["transformer.h.1.mlp.c_fc"][1] is fc[1]
    one_line_error(lambda: gpt2.lora_to_gpt2({"blocks.0.attn.q_proj": (q[0], v[1])}), "are not")


def test_the_mlp_uses_the_configured_gelu():
    assert GPTConfig().gelu_approximate == "none" and GPTConfig().ln_eps == 1e-5  # old checkpoints' defaults
    x = torch.tensor([-2.0, -0.5, 0.3, 1.7], dtype=torch.float64)
    by_hand = torch.tensor([0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
                            for v in x.tolist()], dtype=torch.float64)
    exact = torch.tensor([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()],
                         dtype=torch.float64)
    for approximate, expected in (("tanh", by_hand), ("none", exact)):
        mlp = MLP(GPTConfig(n_embd=4, gelu_approximate=approximate)).double()
        with torch.no_grad():  # fc_in and fc_out pick out the first 4 hidden units: mlp(x) = gelu(x)
            mlp.fc_in.weight.zero_()[:4].copy_(torch.eye(4))
            mlp.fc_out.weight.zero_()[:, :4].copy_(torch.eye(4))
            mlp.fc_in.bias.zero_(), mlp.fc_out.bias.zero_()
            assert torch.allclose(mlp(x), expected, atol=1e-12, rtol=0)
    assert (by_hand - exact).abs().max() > 1e-4  # the two differ: the check can tell them apart
