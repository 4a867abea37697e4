"""
GPT-2 checkpoints in and out of model.py's GPT: a Hugging Face GPT-2 folder (config.json,
model.safetensors, vocab.json, merges.txt) is the same network as GPT with gelu_approximate="tanh"
and ln_eps=layer_norm_epsilon, laid out differently. Per block N (C = n_embd):

    GPT-2 (model.safetensors)                 model.py (state_dict)
    wte.weight (V, C), wpe.weight (P, C)      wte.weight, wpe.weight (block_size = n_positions = P)
    h.N.ln_1.{weight,bias}                    blocks.N.ln_1.{weight,bias}
    h.N.attn.c_attn.weight (C, 3C)            blocks.N.attn.{q,k,v}_proj.weight (C, C): columns
    h.N.attn.c_attn.bias (3C)                   0:C, C:2C, 2C:3C, each transposed; the bias split the same
    h.N.attn.c_proj.{weight (C, C), bias}     blocks.N.attn.out_proj    (weight transposed)
    h.N.ln_2.{weight,bias}                    blocks.N.ln_2
    h.N.mlp.c_fc.{weight (C, 4C), bias}       blocks.N.mlp.fc_in        (weight transposed)
    h.N.mlp.c_proj.{weight (4C, C), bias}     blocks.N.mlp.fc_out       (weight transposed)
    ln_f.{weight,bias}                        ln_f
    (lm_head.weight, tied: optional)          lm_head.weight = wte.weight (the same tensor)
    h.N.attn.bias, h.N.attn.masked_bias       (causal-mask buffers, not weights: skipped)

GPT-2's Conv1D computes x @ W + b with W stored (in, out); nn.Linear stores (out, in), hence the
transposes. Keys are read with or without the "transformer." prefix (GPT2LMHeadModel's files carry
it, GPT2Model's do not) and written with it and without lm_head.weight, as
GPT2LMHeadModel.save_pretrained writes them; GPT2LMHeadModel.from_pretrained loads such a folder.

    model = from_pretrained("gpt2")                        # a GPT in float32, the file's weights
    write_folder("out", model, model.config, tokenizer_from="gpt2")   # and back, bit for bit
    lora_to_gpt2({"blocks.0.attn.q_proj": (A, B), ...})    # LoRA factors renamed, q/k/v stacked

dtype: to_project_state and to_gpt2_state only move tensors, in the dtype they came in (a float16
file stays float16, nothing is rounded); from_pretrained returns a float32 model, as the project
trains in float32 under autocast (float16 and bfloat16 widen to float32 exactly), and write_folder
writes the model's dtype unless told another. Dropout is not read (the project trains without it):
the written config.json states the model's own, config.dropout.
"""
import json
import os
import re
import shutil

import torch
import torch.nn as nn

import tensorfile
from model import GPT, GPTConfig

PREFIX = "transformer."
# GPT-2's activation_function names -> F.gelu's approximate; gelu_new is the tanh approximation
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
WRITTEN_ACTIVATION = {"tanh": "gelu_new", "none": "gelu"}
# per block: project module -> (GPT-2 module, which third of c_attn's output columns, or None)
PROJECT_TO_GPT2 = {"attn.q_proj": ("attn.c_attn", 0), "attn.k_proj": ("attn.c_attn", 1),
                   "attn.v_proj": ("attn.c_attn", 2), "attn.out_proj": ("attn.c_proj", None),
                   "mlp.fc_in": ("mlp.c_fc", None), "mlp.fc_out": ("mlp.c_proj", None)}


def is_folder(path):
    """A base given as a folder is a GPT-2 folder (a base checkpoint is a file)."""
    return path is not None and os.path.isdir(path)


class GPT2Error(ValueError):
    """A GPT-2 folder, state or config that this layout cannot take: one line that says why."""


# ----------------------------------------------------------------------------- config.json

def read_config(folder) -> GPTConfig:
    """The GPTConfig of the GPT-2 folder's config.json; every key it needs must be there (no defaults)."""
    if not os.path.isdir(folder):
        raise GPT2Error(f"{folder} is not a folder")
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise GPT2Error(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPT2Error(f"{path} is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise GPT2Error(f"{path} is not a JSON object")
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon",
                "activation_function"):
        if key not in cfg:
            raise GPT2Error(f"{path} lacks {key!r}")
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise GPT2Error(f"{path}: {key} must be a positive integer, got {cfg[key]!r}")
    eps = cfg["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise GPT2Error(f"{path}: layer_norm_epsilon must be a positive number, got {eps!r}")
    act = cfg["activation_function"]
    if act not in ACTIVATIONS:
        raise GPT2Error(f"{path}: activation_function {act!r} is not one of {', '.join(ACTIVATIONS)}")
    # the keys that would change the math model.py does: their GPT-2 defaults are what it does
    for key, value in {"model_type": "gpt2", "n_inner": None, "scale_attn_weights": True,
                       "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}.items():
        if cfg.get(key, value) != value and not (key == "n_inner" and cfg[key] == 4 * cfg["n_embd"]):
            raise GPT2Error(f"{path}: {key} {cfg[key]!r} is not a GPT-2 layout model.py can hold")
    if cfg["n_embd"] % cfg["n_head"]:
        raise GPT2Error(f"{path}: n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}")
    return GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"], ln_eps=float(eps),
                     gelu_approximate=ACTIVATIONS[act])


def check_writable(config):
    """Refuse a GPTConfig that GPT-2's layout cannot hold."""
    if config.bidirectional:
        raise GPT2Error("a bidirectional (encoder) model has no GPT-2 layout: GPT-2 is causal")
    if config.n_classes:
        raise GPT2Error(f"a classifier (n_classes {config.n_classes}) has no GPT-2 layout "
                        "(its cls_head would be lost)")
    if config.gelu_approximate not in WRITTEN_ACTIVATION:
        raise GPT2Error(f"gelu_approximate {config.gelu_approximate!r} has no GPT-2 activation_function")


def gpt2_config(config, dtype=torch.float32):
    """config.json's dict for a GPTConfig: the keys GPT-2's has, stating the math model.py does."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
            "n_inner": None, "layer_norm_epsilon": config.ln_eps,
            "activation_function": WRITTEN_ACTIVATION[config.gelu_approximate],
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "initializer_range": 0.02,
            "torch_dtype": str(dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------- the two layouts

def gpt2_shapes(config):
    """{GPT-2 name (no prefix): shape} of every weight, in the file's order."""
    C, shapes = config.n_embd, {"wte.weight": (config.vocab_size, config.n_embd),
                                "wpe.weight": (config.block_size, config.n_embd)}
    for n in range(config.n_layer):
        for name, shape in (("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
                            ("attn.c_attn.weight", (C, 3 * C)), ("attn.c_attn.bias", (3 * C,)),
                            ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                            ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                            ("mlp.c_fc.weight", (C, 4 * C)), ("mlp.c_fc.bias", (4 * C,)),
                            ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))):
            shapes[f"h.{n}.{name}"] = shape
    return {**shapes, "ln_f.weight": (C,), "ln_f.bias": (C,)}


def project_shapes(config):
    """{model.py name: shape} of GPT(config)'s state_dict without a cls_head, in its order."""
    C, shapes = config.n_embd, {"wte.weight": (config.vocab_size, config.n_embd),
                                "wpe.weight": (config.block_size, config.n_embd)}
    for n in range(config.n_layer):
        for name, shape in (("ln_1", (C,)), ("attn.q_proj", (C, C)), ("attn.k_proj", (C, C)),
                            ("attn.v_proj", (C, C)), ("attn.out_proj", (C, C)), ("ln_2", (C,)),
                            ("mlp.fc_in", (4 * C, C)), ("mlp.fc_out", (C, 4 * C))):
            shapes[f"blocks.{n}.{name}.weight"] = shape
            shapes[f"blocks.{n}.{name}.bias"] = shape[:1]
    return {**shapes, "ln_f.weight": (C,), "ln_f.bias": (C,), "lm_head.weight": (config.vocab_size, C)}


def check_tensors(state, expected, where, shown=None):
    """Raise GPT2Error at the first missing, extra, mis-shaped or non-float tensor of state against
    expected {name: shape}; shown maps a name to the one to print (the file's, prefix and all)."""
    shown = shown or {}
    for name, shape in expected.items():
        if name not in state:
            raise GPT2Error(f"{where} lacks {shown.get(name, name)} (expected shape {tuple(shape)})")
    for name in state:
        if name not in expected:
            raise GPT2Error(f"{where} has an unexpected tensor {shown.get(name, name)} "
                            f"of shape {tuple(state[name].shape)}")
    for name, shape in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(shape):
            raise GPT2Error(f"{where}: {shown.get(name, name)} has shape {tuple(t.shape)}, "
                            f"expected {tuple(shape)}")
        if not t.is_floating_point():
            raise GPT2Error(f"{where}: {shown.get(name, name)} is {t.dtype}, not a float tensor")


@torch.no_grad()  # a layout change: nothing here is part of a graph
def to_project_state(hf_state: dict, config: GPTConfig, where="the GPT-2 state") -> dict:
    """A GPT-2 state ({name: tensor}, with or without the prefix) as GPT(config)'s state_dict (no
    cls_head), each tensor in its own dtype; lm_head.weight is wte.weight itself. Errors name where."""
    state, mask = {}, re.compile(r"h\.(\d+)\.attn\.(bias|masked_bias)")
    # a message names a tensor as the file does: a missing one with the prefix the others carry
    prefixed = any(key.startswith(PREFIX) for key in hf_state)
    shown = {name: PREFIX + name for name in gpt2_shapes(config)} if prefixed else {}
    for key, t in hf_state.items():
        name = key.removeprefix(PREFIX)
        if name in state:
            raise GPT2Error(f"{where} holds {name} twice (with and without {PREFIX!r})")
        m = mask.fullmatch(name)
        if m and int(m.group(1)) < config.n_layer:
            continue  # the causal mask is a buffer GPT-2 rebuilds: SDPA's is_causal does its work here
        state[name], shown[name] = t, key
    head = state.pop("lm_head.weight", None)
    check_tensors(state, gpt2_shapes(config), where, shown)
    wte = state["wte.weight"]  # (V, C)
    if head is not None and not torch.equal(head, wte):
        raise GPT2Error(f"{where}: lm_head.weight differs from wte.weight (model.py ties the head)")
    C, out = config.n_embd, {"wte.weight": wte, "wpe.weight": state["wpe.weight"]}
    for n in range(config.n_layer):
        h, b = f"h.{n}.", f"blocks.{n}."
        out[b + "ln_1.weight"], out[b + "ln_1.bias"] = state[h + "ln_1.weight"], state[h + "ln_1.bias"]
        w, bias = state[h + "attn.c_attn.weight"], state[h + "attn.c_attn.bias"]  # (C, 3C), (3C)
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{b}attn.{proj}.weight"] = w[:, i * C:(i + 1) * C].t().contiguous()  # (C out, C in)
            out[f"{b}attn.{proj}.bias"] = bias[i * C:(i + 1) * C].clone()  # (C)
        out[b + "attn.out_proj.weight"] = state[h + "attn.c_proj.weight"].t().contiguous()  # (C, C)
        out[b + "attn.out_proj.bias"] = state[h + "attn.c_proj.bias"]
        out[b + "ln_2.weight"], out[b + "ln_2.bias"] = state[h + "ln_2.weight"], state[h + "ln_2.bias"]
        out[b + "mlp.fc_in.weight"] = state[h + "mlp.c_fc.weight"].t().contiguous()  # (4C, C)
        out[b + "mlp.fc_in.bias"] = state[h + "mlp.c_fc.bias"]  # (4C)
        out[b + "mlp.fc_out.weight"] = state[h + "mlp.c_proj.weight"].t().contiguous()  # (C, 4C)
        out[b + "mlp.fc_out.bias"] = state[h + "mlp.c_proj.bias"]  # (C)
    out["ln_f.weight"], out["ln_f.bias"] = state["ln_f.weight"], state["ln_f.bias"]
    out["lm_head.weight"] = wte  # tied: the same tensor, as in GPT's own state_dict
    return out


def from_pretrained(folder) -> GPT:
    """A float32 GPT (train mode, as GPT() builds it) holding the GPT-2 folder's weights."""
    config = read_config(folder)
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path) and os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        raise GPT2Error(f"{path} does not exist (pytorch_model.bin is a pickle, which is not read)")
    try:
        tensors, _ = tensorfile.read(path)
    except tensorfile.TensorFileError as e:
        raise GPT2Error(str(e)) from None
    state = to_project_state(tensors, config, path)
    model = GPT(config)  # float32 parameters: load_state_dict copies each tensor in, widening it
    model.load_state_dict(state)
    return model


@torch.no_grad()
def to_gpt2_state(project_state: dict, config: GPTConfig) -> dict:
    """GPT(config)'s state_dict as GPT2LMHeadModel's: "transformer."-prefixed keys, c_attn fused, Conv1D
    weights (in, out), no lm_head.weight (tied) and no mask buffers; each tensor in its own dtype."""
    check_writable(config)
    state = dict(project_state)
    head = state.pop("lm_head.weight", None)
    expected = project_shapes(config)
    expected.pop("lm_head.weight")
    check_tensors(state, expected, "the model's state")
    if head is not None and head is not state["wte.weight"] and not torch.equal(head, state["wte.weight"]):
        raise GPT2Error("the model's lm_head.weight differs from wte.weight (GPT-2 ties the head)")
    out = {PREFIX + "wte.weight": state["wte.weight"], PREFIX + "wpe.weight": state["wpe.weight"]}
    for n in range(config.n_layer):
        h, b = f"{PREFIX}h.{n}.", f"blocks.{n}."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = state[b + "ln_1.weight"], state[b + "ln_1.bias"]
        qkv = [f"{b}attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj")]
        out[h + "attn.c_attn.weight"] = torch.cat([state[p + ".weight"].t() for p in qkv], dim=1)  # (C, 3C)
        out[h + "attn.c_attn.bias"] = torch.cat([state[p + ".bias"] for p in qkv])  # (3C)
        out[h + "attn.c_proj.weight"] = state[b + "attn.out_proj.weight"].t().contiguous()  # (C, C)
        out[h + "attn.c_proj.bias"] = state[b + "attn.out_proj.bias"]
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = state[b + "ln_2.weight"], state[b + "ln_2.bias"]
        out[h + "mlp.c_fc.weight"] = state[b + "mlp.fc_in.weight"].t().contiguous()  # (C, 4C)
        out[h + "mlp.c_fc.bias"] = state[b + "mlp.fc_in.bias"]  # (4C)
        out[h + "mlp.c_proj.weight"] = state[b + "mlp.fc_out.weight"].t().contiguous()  # (4C, C)
        out[h + "mlp.c_proj.bias"] = state[b + "mlp.fc_out.bias"]  # (C)
    out[PREFIX + "ln_f.weight"], out[PREFIX + "ln_f.bias"] = state["ln_f.weight"], state["ln_f.bias"]
    return out


# ----------------------------------------------------------------------------- writing a folder

def write_folder(folder, model_or_state, config: GPTConfig, tokenizer_from=None, dtype=None):
    """Write a GPT-2 folder that GPT2LMHeadModel.from_pretrained loads: config.json, model.safetensors
    (in dtype, else the model's own), and vocab.json and merges.txt copied from tokenizer_from."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = to_gpt2_state(state, config)  # checks everything before a byte is written
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    names = ("vocab.json", "merges.txt") if tokenizer_from else ()
    tokenizer = [os.path.join(tokenizer_from, name) for name in names]
    for path in tokenizer:
        if not os.path.isfile(path):
            raise GPT2Error(f"{path} does not exist")
    os.makedirs(folder, exist_ok=True)
    tensorfile.atomic_write(os.path.join(folder, "model.safetensors"),
                 lambda fh: tensorfile.write(fh, tensors, {"format": "pt"}))  # "pt": what HF writes
    cfg = gpt2_config(config, next(iter(tensors.values())).dtype)
    tensorfile.atomic_write(os.path.join(folder, "config.json"),
                 lambda fh: fh.write(json.dumps(cfg, indent=2).encode()))
    for path in tokenizer:
        with open(path, "rb") as src:
            tensorfile.atomic_write(os.path.join(folder, os.path.basename(path)),
                         lambda fh: shutil.copyfileobj(src, fh))


# ----------------------------------------------------------------------------- LoRA factors

def gpt2_module(project_path):
    """(GPT2LMHeadModel's module path, part) of a model.py module path: part is 0, 1, 2 for q, k, v's
    thirds of c_attn's output, None for a module that maps whole. "blocks.3.attn.k_proj" ->
    ("transformer.h.3.attn.c_attn", 1)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(attn\.\w+|mlp\.\w+)", project_path)
    if not m or m.group(2) not in PROJECT_TO_GPT2:
        raise GPT2Error(f"{project_path!r} is not one of model.py's adaptable modules "
                        f"(blocks.N.{{{','.join(PROJECT_TO_GPT2)}}})")
    module, part = PROJECT_TO_GPT2[m.group(2)]
    return f"{PREFIX}h.{m.group(1)}.{module}", part


def lora_to_gpt2(factors: dict) -> dict:
    """{model.py module path: (lora_A (r, d_in), lora_B (d_out, r))} -> {GPT-2 module path: (lora_A,
    lora_B)}, nn.Linear's orientation kept (PEFT's too, fan_in_fan_out or not). A block's q, k, v go
    into one c_attn: lora_A = [A_q; A_k; A_v] (r_q+r_k+r_v, C), lora_B = blockdiag(B_q, B_k, B_v)
    (3C, r_q+r_k+r_v), so lora_B @ lora_A = [dW_q; dW_k; dW_v]; an absent projection adds no rank
    and zero rows."""
    out, fused = {}, {}
    for path, (A, B) in factors.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise GPT2Error(f"{path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                            "are not (r, d_in), (d_out, r)")
        target, part = gpt2_module(path)
        if part is None:
            out[target] = (A, B)
        else:
            fused.setdefault(target, {})[part] = (path, A, B)
            out.setdefault(target, None)  # keeps the first appearance's place in the order
    for target, parts in fused.items():
        (path, A0, B0), *_ = parts.values()
        for path, A, B in parts.values():
            if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0]:
                raise GPT2Error(f"{path}: d_in {A.shape[1]}, d_out {B.shape[0]} differ from the rest "
                                f"of {target}'s ({A0.shape[1]}, {B0.shape[0]})")
        C, ranks = B0.shape[0], [parts[i][1].shape[0] if i in parts else 0 for i in range(3)]
        lora_A = torch.cat([parts[i][1] for i in range(3) if i in parts], dim=0)  # (r_q+r_k+r_v, d_in)
        lora_B = B0.new_zeros(3 * C, sum(ranks))  # (3C, r_q+r_k+r_v): off-diagonal blocks stay zero
        for i in parts:
            r0 = sum(ranks[:i])
            lora_B[i * C:(i + 1) * C, r0:r0 + ranks[i]] = parts[i][2]  # (C, r_i)
        out[target] = (lora_A, lora_B)
    return out
