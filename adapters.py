"""
What the library does with adapters once they exist: one registry of the kinds, safe adapter files,
merging, and the export to PEFT's standard LoRA format.

    KINDS = {"triadapt": TriAdaptLinear + RankAllocator,   "lora": LoRALinear (no allocator),
             "adalora": AdaLoRALinear + AdaLoRAAllocator,   "increlora": IncreLoRALinear + IncreLoRAAllocator}

Every layer class knows its own four things: adapter_entry() (save: its kind, its settings and its
active values), from_entry(base, entry) (load), merge()/unmerge(), and lora_factors() (the fold).
An adapter file is plain data and tensors, {"format": FORMAT, "layers": {name: entry}, ...}, written by
torch.save and read with torch.load(weights_only=True): reading one cannot run code. Each entry names
its kind and settings (alpha, r_ref, blocks, fan_in_fan_out, ...); a reader never fills in a default.

The LoRA fold: every adapter here is a LoRA with a rank r per matrix,

    dW = s B C A = lora_B @ lora_A,   lora_B (d_out, r),   lora_A (r, d_in)

(C = L + U for TriAdaptLoRA, diag(E) for AdaLoRA, diag(lambda) for IncreLoRA's diagonal core, I for
LoRA). PEFT scales a module's LoRA by lora_alpha / r, so alpha_pattern[m] = rank_pattern[m] = r_m makes
the scale 1 and the export exact; a serving stack that caps the LoRA rank needs a cap >= max(r_m).

    layers = triadapt.inject(model, ["q_proj", "v_proj"])       # ... train ...
    save_file({"format": FORMAT, "layers": adapter_state(layers)}, path)
    load_adapter(other_model, load_file(path)["layers"])         # the same adapters, on another copy
    config, tensors = peft_config(fold), peft_tensors(fold)      # fold = lora_fold(layers); report.py
                                                                 # writes them: report.write_peft_lora()
"""
import pickle
from dataclasses import dataclass

import torch

import baselines
import triadapt

FORMAT = "triadapt-adapter-2"  # 2: every entry names its kind and settings, and files load weights_only


@dataclass(frozen=True)
class Kind:
    layer_cls: type
    allocator_cls: type = None  # None: the rank never changes


KINDS = {"triadapt": Kind(triadapt.TriAdaptLinear, triadapt.RankAllocator),
         "lora": Kind(baselines.LoRALinear),
         "adalora": Kind(baselines.AdaLoRALinear, baselines.AdaLoRAAllocator),
         "increlora": Kind(baselines.IncreLoRALinear, baselines.IncreLoRAAllocator)}


class AdapterFileError(ValueError):
    """A file that is not a safe, well-formed adapter (or checkpoint): one line that says why."""


def adapter_layers(model):
    """{qualified name: adapter layer} of every adapter in `model`."""
    return {n: m for n, m in model.named_modules() if any(isinstance(m, k.layer_cls) for k in KINDS.values())}


# ----------------------------------------------------------------------------- files

def save_file(obj, fh):
    """torch.save of plain data and tensors (the only things load_file() will read back)."""
    torch.save(obj, fh)


def load_file(path, what="file"):
    """torch.load(weights_only=True): tensors, numbers, strings, lists, tuples, dicts; anything else (an
    object whose unpickling would run code) is refused before it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterFileError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{what} {path} is a directory, not a file") from None
    except pickle.UnpicklingError as e:  # torch names the global it would have called
        if "GLOBAL" in str(e) or "Unsupported class" in str(e):
            raise AdapterFileError(f"{what} {path} is refused: it holds objects that would run code when "
                                   f"loaded (only tensors and plain data are read)") from None
        raise AdapterFileError(f"{what} {path} is truncated or corrupt (UnpicklingError)") from None
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise AdapterFileError(f"{what} {path} is truncated or corrupt ({type(e).__name__})") from None


def adapter_state(layers):
    """{name: entry}: every layer's adapter_entry() on the CPU (a copy: training goes on)."""
    return {name: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                   for k, v in layer.adapter_entry().items()} for name, layer in layers.items()}


def load_adapter(model, state):
    """Wrap, in place, the layers of `model` named in `state` (adapter_state's output) in the adapters
    their entries describe, holding the saved values; returns {name: layer}."""
    layers = {}
    for name, entry in state.items():
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in KINDS:
            raise AdapterFileError(f"{name}: unknown adapter kind {kind!r} (known: {', '.join(KINDS)})")
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise AdapterFileError(f"{name}: the model has no such layer") from None
        try:
            layer = KINDS[kind].layer_cls.from_entry(base, entry)
        except KeyError as e:
            raise AdapterFileError(f"{name}: the {kind} entry records no {e.args[0]!r}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        layers[name] = layer
    return layers


@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter of `model` into its base weight (W <- W + dW) and put the plain base layer back
    in the adapter's place, so that the state_dict has the keys of the model without adapters."""
    for name, layer in adapter_layers(model).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base)
    return model


# ----------------------------------------------------------------------------- the LoRA export

def lora_fold(layers):
    """{name: (lora_A (r, d_in), lora_B (d_out, r))} in float32, lora_B @ lora_A = dW; rank 0 left out."""
    fold = {}
    for name, layer in layers.items():
        lora_A, lora_B = layer.lora_factors()
        if lora_A.shape[0]:
            fold[name] = (lora_A.float().cpu().contiguous(), lora_B.float().cpu().contiguous())
    return fold


def peft_config(fold, fan_in_fan_out=False, base_model=None):
    """PEFT's adapter_config.json for a LoRA of per-module ranks whose scale lora_alpha / r is 1."""
    if not fold:
        raise AdapterFileError("every adapter has rank 0: there is no LoRA to export")
    ranks = {name: int(a.shape[0]) for name, (a, _) in fold.items()}
    r = max(ranks.values())
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
            "target_modules": sorted(ranks), "r": r, "lora_alpha": r,
            "rank_pattern": ranks, "alpha_pattern": dict(ranks), "fan_in_fan_out": fan_in_fan_out,
            "lora_dropout": 0.0, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "inference_mode": True}


def peft_tensors(fold):
    """PEFT's tensor names: base_model.model.<module path>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r)."""
    tensors = {}
    for name, (lora_A, lora_B) in fold.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B
    return tensors
