"""
Use what a fine-tuning run trained: sample text, classify snippets, or export a merged checkpoint.

    python sample.py --run out/linear --prompt "The " --num-samples 3 --max-new-tokens 200 \\
        --temperature 0.8 --top-k 50 --seed 1 --device auto      # base + adapter, nanoGPT's sampling
    python sample.py --run out/linear --prompt FILE:prompt.txt    # the prompt from a file
    python sample.py --run out/linear --export merged.pt          # dW folded into W: a plain checkpoint
    python sample.py --merged merged.pt --prompt "The "           # sample from that file alone
    python sample.py --run out/package-linear --text "import asyncio"   # label and probabilities
    python sample.py --run out/cola-linear --text "x = (1,"              # does it parse?
    python sample.py --run out/package-linear --file snippet.py

A finished run's folder holds adapter.pt (train.py writes it): only what the run trained, the
factors A, B (and L, U with their block sizes) of every adapted matrix and, for a classifier, its
new head; the settings that rebuild them (schedule, targets, alpha, r_ref, n_classes); the path of
the base checkpoint and a sha256 fingerprint of the base's weights. Loading puts the adapters back
on that base, bit for bit the model the run ended with, after checking the fingerprint, so an
adapter never lands on a base it was not trained on. A `full` run trains every weight: its
adapter.pt is the whole fine-tuned state_dict (and as large as the base).

--export folds every adapter into its base weight,

    W <- W + dW,    dW = s B (L + U) A, s = alpha / r_ref  (TriAdaptLoRA)    dW = s B A, s = alpha / r  (LoRA)

and writes {"model": state_dict, "config": GPTConfig as a dict}, the format of a base checkpoint:
model.py loads it with no adapter code, and `train.py --init-from merged.pt` fine-tunes it further.

Bad input (a missing run or adapter, a base that is not the adapter's, a prompt longer than the
context, a non-positive count or temperature, --device cuda without CUDA, a truncated file, an
--export path that cannot be written) exits with status 2 and one line on stderr.
"""
import argparse
import math
import os
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

import adapters
import data
import gpt2
import options
import report
import tasks
from model import GPT, GPTConfig
from options import UsageError, load_checkpoint


def build_parser():
    p = argparse.ArgumentParser(description="Sample from, classify with, or export a fine-tuned run.",
                                formatter_class=options.HelpFormatter)
    p.add_argument("--run", default=None,
                   help="a run folder holding adapter.pt (out/<schedule>, out/<task>-<schedule>)")
    p.add_argument("--base", default=None,
                   help="the base checkpoint to put the adapter on, instead of the path "
                        "recorded in adapter.pt; it must be the base the run trained on")
    p.add_argument("--merged", default=None,
                   help="a merged checkpoint (--export's output, or a base checkpoint) "
                        "to use instead of --run")
    p.add_argument("--export", default=None,
                   help="write the run's model, adapters merged into the base weights, to this file and exit")
    p.add_argument("--export-lora", default=None,
                   help="write the run's adapters to this folder in PEFT's LoRA format "
                        "(adapter_config.json, adapter_model.safetensors) and exit")
    p.add_argument("--prompt", default="The ",
                   help="text the samples continue; FILE:path reads it from a file")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes generated per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits: below 1 is more conservative, above 1 more random")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely next bytes only")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    p.add_argument("--text", default=None, help="classification run: the snippet to classify")
    p.add_argument("--file", default=None, help="classification run: a file whose bytes to classify")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto picks cuda when available")
    return p


def validate(args):
    """The checks that need no file: counts, temperature, device, which flags go together."""
    if (args.run is None) == (args.merged is None):
        raise UsageError("give one of --run (a run folder) and --merged (a merged checkpoint)")
    if args.export and args.merged:
        raise UsageError("--export needs --run: a --merged checkpoint is merged already")
    if args.export_lora and not args.run:
        raise UsageError("--export-lora needs --run: a --merged checkpoint holds no adapters")
    if args.export and args.export_lora:
        raise UsageError("give --export or --export-lora, not both")
    if args.export_lora and os.path.exists(args.export_lora) and not os.path.isdir(args.export_lora):
        raise UsageError(f"--export-lora {args.export_lora} is a file, not a folder")
    if args.base and not args.run:
        raise UsageError("--base goes with --run: it is the base the run's adapter goes on")
    if args.text is not None and args.file is not None:
        raise UsageError("give --text or --file, not both")
    for name in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a positive number, got {args.temperature}")
    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here (try --device cpu)")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device_name = "cuda" if cuda else "cpu"


# ----------------------------------------------------------------------------- loading

def read_adapter(run):
    """The adapter.pt of a run folder, checked to be one: (adapter dict, its path)."""
    if not os.path.exists(run):
        raise UsageError(f"run folder {run} does not exist")
    if not os.path.isdir(run):
        raise UsageError(f"--run {run} is a file: give the run's folder (the one holding adapter.pt)")
    path = os.path.join(run, "adapter.pt")
    if not os.path.exists(path):
        raise UsageError(f"run folder {run} holds no adapter.pt (train.py writes it when a run finishes)")
    adapter = load_checkpoint(path, "adapter")
    if isinstance(adapter, dict) and adapter.get("format") == "triadapt-adapter-1":
        raise UsageError(f"{path} is an adapter file of the first format (triadapt-adapter-1), whose entries do "
                         f"not all record their kind and settings: train the run again to write {adapters.FORMAT}")
    if not isinstance(adapter, dict) or adapter.get("format") != adapters.FORMAT:
        raise UsageError(f"{path} is not an adapter file of this version ({adapters.FORMAT})")
    return adapter, path


def read_plain_checkpoint(path, what):
    """A base or merged checkpoint: a dict with a state_dict of tensors under "model" and a config; or a
    GPT-2 folder (gpt2.py), read as one."""
    if os.path.isdir(path):
        try:
            model = gpt2.from_pretrained(path)
        except gpt2.GPT2Error as e:
            raise UsageError(f"{what} {path}: {e}") from None
        return {"model": model.state_dict(), "config": asdict(model.config)}
    ckpt = load_checkpoint(path, what)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    tensors = isinstance(state, dict) and all(map(torch.is_tensor, state.values()))
    if not (tensors and isinstance(ckpt.get("config"), dict)):
        raise UsageError(f"{what} {path} holds no model and config")
    return ckpt


def read_base(adapter, adapter_path, base=None):
    """The base checkpoint the adapter belongs to: --base or the recorded path, whose weights must
    have the fingerprint recorded in the adapter."""
    path = base or adapter["base_path"]
    if path is None:
        raise UsageError(f"{adapter_path} records no base checkpoint: give it with --base")
    if base is None and not os.path.exists(path):
        raise UsageError(f"base checkpoint {path}, recorded in {adapter_path}, does not exist "
                         f"(give one with --base)")
    ckpt = read_plain_checkpoint(path, "base checkpoint")
    found = report.state_fingerprint(ckpt["model"])
    if found != adapter["base_fingerprint"]:
        raise UsageError(f"base checkpoint {path} is not the base of {adapter_path}: "
                         f"its weights' fingerprint is {found[:12]}, "
                         f"the adapter's base has {adapter['base_fingerprint'][:12]}")
    return ckpt


def model_from_adapter(adapter, base_ckpt, adapter_path="adapter"):
    """The fine-tuned model, rebuilt on the CPU: the base, then the adapters from their saved block sizes
    and the classifier's head, or, for a full fine-tune, the whole saved state_dict."""
    model = GPT(GPTConfig(**{**base_ckpt["config"], "n_classes": adapter["n_classes"]}))
    try:
        if adapter["model"] is not None:
            model.load_state_dict(adapter["model"])
        else:
            # the classification head is the run's, not the base's (a merged classifier brings its own)
            state = {k: v for k, v in base_ckpt["model"].items() if not k.startswith("cls_head.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("cls_head.") for k in missing):
                raise ValueError(f"{len(missing)} missing and {len(unexpected)} unexpected keys in the base")
            adapters.load_adapter(model, adapter["layers"])
            if adapter["cls_head"] is not None:
                model.cls_head.load_state_dict(adapter["cls_head"])
    except (ValueError, RuntimeError, KeyError) as e:  # adapters.AdapterFileError is a ValueError
        raise UsageError(f"{adapter_path} does not fit its base: {first_problem(e)}") from None
    return model.eval()


def load_run(run, base=None):
    """(fine-tuned model on the CPU, adapter dict) of a run folder."""
    adapter, path = read_adapter(run)
    return model_from_adapter(adapter, read_base(adapter, path, base), path), adapter


def load_merged(path):
    """A merged (or base) checkpoint as a plain GPT: model.py alone, no adapter code."""
    ckpt = read_plain_checkpoint(path, "merged checkpoint")
    model = GPT(GPTConfig(**ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"merged checkpoint {path} does not fit its config: {first_problem(e)}") from None
    return model.eval()


def first_problem(e):
    """One line of an exception; load_state_dict's first line is a title, so then its second."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
    return lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]


def merged_checkpoint(model):
    """dW folded into the base weights and the adapter layers replaced by their plain nn.Linear: the
    format of a base checkpoint, {"model": state_dict, "config": asdict(GPTConfig)}."""
    adapters.merge_adapters(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"model": state, "config": asdict(model.config)}


# ----------------------------------------------------------------------------- using the model

def read_input(value, what, tok=None):
    """Tokens of --prompt / --text, or of the file after FILE: (and of --file): bytes, or GPT-2's BPE."""
    if value.startswith("FILE:"):
        value = data.read_text_file(value[len("FILE:"):])
        value = value if tok is None else value.decode("utf-8", errors="replace")
    raw = tasks.encode(value, tok)
    if not raw:
        raise UsageError(f"the {what} is empty")
    return list(raw)


def check_fits(ids, model, what):
    if len(ids) > model.config.block_size:
        raise UsageError(f"the {what} is {len(ids)} bytes, longer than the model's context "
                         f"(block_size {model.config.block_size})")


@torch.no_grad()
def generate_samples(model, prompt, num_samples, max_new_tokens, temperature, top_k, seed, device="cpu", tok=None):
    """num_samples texts continuing the prompt (a list of byte ids), drawn from one seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt], device=device)  # (1, T)
    return [tasks.decode(model.generate(idx, max_new_tokens, temperature, top_k, generator=gen)[0].tolist(), tok)
            for _ in range(num_samples)]


@torch.no_grad()
def class_probabilities(model, ids, device="cpu"):
    """softmax of the classifier's logits for one snippet: (n_classes,) float64, summing to 1."""
    logits, _ = model.classify(torch.tensor([ids], device=device))  # (1, n_classes)
    return F.softmax(logits[0].double(), dim=-1).cpu()


def labels(task, n_classes):
    names = tasks.TASK_LABELS.get(task, ())
    return list(names) if len(names) == n_classes else [f"class {i}" for i in range(n_classes)]


def run(args):
    if args.run:
        model, adapter = load_run(args.run, args.base)
        task = adapter.get("task")
    else:  # a merged export remembers its task (cola and pairs rows are padded to the block)
        model, adapter = load_merged(args.merged), None
        task = read_plain_checkpoint(args.merged, "merged checkpoint").get("task")
    source = args.run or args.merged
    base = (args.base or adapter["base_path"]) if args.run else args.merged
    tok = tasks.tokenizer(base)  # GPT-2's BPE when the base is a GPT-2 folder
    if args.export_lora:
        return export_lora(model, adapter, args.run, args.export_lora, gpt2_base=tok is not None)
    if args.export and tok is not None:
        return export_gpt2(model, args.run, base, args.export)
    if args.export and os.path.isdir(args.export):
        raise UsageError(f"--export {args.export} is a folder, not a file")
    if args.export:
        merged = {**merged_checkpoint(model), "merged_from": args.run, "task": task}
        try:
            report.atomic_save(merged, args.export)
        except OSError as e:  # makedirs meets a file where a folder of the path should be: FileExistsError
            why = "a part of its path is a file, not a folder" \
                if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
            raise UsageError(f"--export {args.export} cannot be written: {why}") from None
        size = report.human_size(os.path.getsize(args.export))
        full = adapter["schedule"] == "full"
        what = "the fully fine-tuned model" if full else f"{len(adapter['layers'])} adapters"
        print(f"merged {what} of {args.run} into {args.export} ({size}); fine-tune it further with: "
              f"python train.py --init-from {args.export}")
        return
    config, model = model.config, model.to(args.device_name)
    if config.n_classes:
        if args.text is None and args.file is None:
            raise UsageError(f"{source} is a classifier: give the snippet to classify with --text or --file")
        ids = read_input(args.text, "snippet") if args.file is None else list(data.read_text_file(args.file))
        if task == "pairs":  # its def line padded as in training
            ids = list(tasks.pair_row(bytes(ids), config.block_size))
        check_fits(ids, model, "snippet")
        while task == "cola" and ids and ids[-1] in b" \t\r\n":  # its snippets end on their last token
            ids = ids[:-1]
        if task in ("cola", "pairs"):  # trained on rows padded to the block: pooling must see the same
            ids = ids + [tasks.PAD] * (config.block_size - len(ids))
        probs = class_probabilities(model, ids, args.device_name)
        names = labels(task, config.n_classes)
        print(f"predicted: {names[int(probs.argmax())]}")
        for i in sorted(range(len(names)), key=lambda i: -probs[i]):
            print(f"  {names[i]:<16} {probs[i]:.4f}")
        return
    if config.bidirectional:
        raise UsageError(f"{source} is a masked-byte encoder without a classifier: it has nothing to sample "
                         f"(sample from a --arch gpt run, classify with a --task cola, pairs or package run)")
    if args.text is not None or args.file is not None:
        raise UsageError(f"{source} is a language model: give --prompt, not --text or --file")
    prompt = read_input(args.prompt, "prompt", tok)
    check_fits(prompt, model, "prompt")
    for text in generate_samples(model, prompt, args.num_samples, args.max_new_tokens, args.temperature,
                                 args.top_k, args.seed, args.device_name, tok):
        print(text)
        print("---------------")


def export_gpt2(model, run_folder, base_folder, folder):
    """A run on a GPT-2 folder, merged, as a GPT-2 folder: c_attn fused, Conv1D weights (in, out), its BPE."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--export {folder} is a file: a GPT-2 base exports to a folder")
    merged = merged_checkpoint(model)
    try:
        gpt2.write_folder(folder, merged["model"], model.config, tokenizer_from=base_folder)
    except gpt2.GPT2Error as e:
        raise UsageError(f"--export {folder}: {e}") from None
    except OSError as e:
        raise UsageError(f"--export {folder} cannot be written: {e.strerror or e}") from None
    print(f"merged {run_folder} into the GPT-2 folder {folder} (config.json, model.safetensors, vocab.json, "
          f"merges.txt); transformers' GPT2LMHeadModel.from_pretrained loads it")


def export_lora(model, adapter, run_folder, folder, gpt2_base=False):
    """The run's adapters as PEFT's LoRA: lora_B @ lora_A = dW for every module, scale 1. On a GPT-2 base,
    for transformers' GPT2LMHeadModel: its module names, q, k, v stacked into c_attn, fan_in_fan_out."""
    if adapter["schedule"] == "full":
        raise UsageError(f"{run_folder} is a full fine-tune: it has no LoRA form (use --export for the merged model)")
    if adapter["cls_head"] is not None:
        raise UsageError(f"{run_folder} is a classifier: its new head has no place in a LoRA file "
                         f"(use --export for the merged model)")
    fold = adapters.lora_fold(adapters.adapter_layers(model))
    if not fold:
        raise UsageError(f"every adapter of {run_folder} has rank 0: there is no LoRA to export")
    if gpt2_base:
        fold = gpt2.lora_to_gpt2(fold)
    try:
        config = adapters.peft_config(fold, fan_in_fan_out=gpt2_base)
        report.write_peft_lora(folder, config, adapters.peft_tensors(fold))
    except OSError as e:
        raise UsageError(f"--export-lora {folder} cannot be written: {e.strerror or e}") from None
    ranks = config["rank_pattern"].values()
    print(f"wrote {len(fold)} LoRA modules of {run_folder} (ranks {min(ranks)}..{max(ranks)}) to {folder}: "
          f"adapter_config.json, adapter_model.safetensors")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        run(args)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
