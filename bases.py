"""
The layers an adapter wraps, on any model: an nn.Linear (weight (d_out, d_in)) or a Conv1D-style layer
(GPT-2's: weight (d_in, d_out), y = x @ W + b, `nf` its width), in any dtype. triadapt.py and baselines.py
build every adapter on these few functions:

    base_shape(base)         (d_out, d_in, fan_in_fan_out) of the layer
    adapter_dtype(weight)    float32 on a float16/bfloat16 base (PEFT's choice), else the base's dtype
    adapter_out(x, CA, B)    (x (CA)^T) B^T in the adapter's dtype, returned in the base output's
    merge_into_base(layer)   W <- W + dW, transposed for a Conv1D
    targets_in(model, targets)          the layers inject() wraps, and what it refuses
    move_to_new_tensors      the optimizer's state into tensors re-created at a larger capacity
    copy_into(views, entry)  an adapter file's tensors into a layer, shapes checked
    count_trainable(model)   adapters by their n_trainable, every other trainable tensor by numel()
"""
import torch
import torch.nn as nn


def base_shape(base, fan_in_fan_out=None):
    """(d_out, d_in, fan_in_fan_out) of a layer to adapt: an nn.Linear stores W (d_out, d_in), a Conv1D
    (GPT-2's, recognized by its `nf`) stores W^T (d_in, d_out) and computes x @ W + b."""
    weight = getattr(base, "weight", None)
    if not (torch.is_tensor(weight) and weight.dim() == 2):
        raise ValueError(f"cannot adapt a {type(base).__name__}: it has no 2-D weight")
    if fan_in_fan_out is None:
        fan_in_fan_out = not isinstance(base, nn.Linear) and hasattr(base, "nf")
    d_out, d_in = weight.shape[::-1] if fan_in_fan_out else weight.shape
    return d_out, d_in, fan_in_fan_out


def adapter_dtype(weight):
    """float32 on a half-precision base (PEFT's choice): near 1.0 bf16's spacing is 2^-7, so AdamW's small
    updates to the core's diagonal would round away."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def to_adapter_dtype(x, A):
    """x in the adapter's dtype (float32 on a half-precision base); under autocast the matmul picks its
    own dtype, and a cast here would only add an op."""
    return x if x.dtype == A.dtype or torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)


def adapter_out(x, CA, B, dtype):
    """(x (CA)^T) B^T in the adapter's dtype, returned in `dtype` (the base's output's)."""
    out = (to_adapter_dtype(x, CA) @ CA.t()) @ B.t()  # (..., d_out)
    return out if out.dtype == dtype else out.to(dtype)


@torch.no_grad()
def merge_into_base(layer, sign):
    """W <- W + sign dW (W^T for a Conv1D base) for any adapter layer with delta_weight() and `merged`."""
    if layer.merged != (sign > 0):
        dW = layer.delta_weight()  # (d_out, d_in)
        weight = layer.base.weight
        weight += sign * (dW.t() if layer.fan_in_fan_out else dW).to(weight.dtype)
        layer.merged = sign > 0


def adaptable(module):
    """An nn.Linear, or a Conv1D-style layer (a 2-D weight and GPT-2's `nf`, its output width)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (hasattr(module, "nf") and torch.is_tensor(weight) and weight.dim() == 2)


def targets_in(model, targets):
    """[(qualified name, layer)] of the adaptable layers whose names end with a target (whole components:
    "proj" matches "mlp.proj", not "attn.out_proj"). Refused: a target matching nothing, and the out_proj
    of an nn.MultiheadAttention, which hands its weight to a fused kernel instead of calling it."""
    candidates = [(n, m) for n, m in model.named_modules() if adaptable(m)]
    chosen = [(n, m) for n, m in candidates if any(n == t or n.endswith("." + t) for t in targets)]
    for name, _ in chosen:
        parent, _, child = name.rpartition(".")
        if child == "out_proj" and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            raise ValueError(f"{name} cannot be adapted: its parent nn.MultiheadAttention reads its weight "
                             f"directly instead of calling it")
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in chosen)]
    if missing:
        kinds = sorted({n.rpartition(".")[2] for n, _ in candidates})
        raise ValueError(f"no nn.Linear or Conv1D named {', '.join(missing)}; those in this model: {', '.join(kinds)}")
    return chosen


def move_to_new_tensors(optimizer, old, new):
    """An adapter's capacity grew: put each re-created tensor of `new` ({name: parameter}) in its `old`
    one's place in the optimizer (same param group), its state zero-padded into the new shape; a newly
    active entry starts with zero moments, and the step count stays as it was."""
    swap = {id(old[n]): p for n, p in new.items() if n in old and old[n] is not p}
    for group in optimizer.param_groups:
        group["params"] = [swap.get(id(p), p) for p in group["params"]]
    for o in [o for o in list(optimizer.state) if id(o) in swap]:
        state, n = optimizer.state.pop(o), swap[id(o)]
        for key, v in state.items():
            if torch.is_tensor(v) and v.shape == o.shape:
                state[key] = v.new_zeros(n.shape)
                state[key][tuple(slice(0, size) for size in o.shape)] = v
        optimizer.state[n] = state


@torch.no_grad()
def copy_into(views, entry):
    """Copy entry[key] into views[key] (a layer's tensor, or a view of its active entries) for each key,
    refusing a saved shape that differs: loading an adapter file."""
    for key, view in views.items():
        if view.shape != entry[key].shape:
            raise ValueError(f"{key} is saved as {tuple(entry[key].shape)}, the layer holds {tuple(view.shape)}")
        view.copy_(entry[key])


def count_trainable(model):
    """Trainable numbers of `model`: adapters by n_trainable (never their masked zeros), every other
    trainable tensor by numel()."""
    adapters = [m for m in model.modules() if hasattr(m, "n_trainable")]  # any adapter class
    own = {id(p) for m in adapters for p in m.parameters(recurse=False)}
    others = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in own)
    return others + sum(m.n_trainable for m in adapters)
