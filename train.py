"""
Pretrain a small transformer, then fine-tune it through growing triangular adapters.

    python train.py                                    # CPU-sized defaults, a few minutes on 2 cores
    python train.py --schedule linear --device cuda    # the same run on a GPU
    python train.py --schedule linear,lora,full --iters 200   # several methods, one comparison table
    python train.py --arch encoder --task classify     # BERT-style encoder, sequence classification

The flow: (1) tokenize and cache the two corpora (data.py); (2) pretrain a base model on the
base corpus, or reuse the one saved under --out-dir/base for the same settings; (3) for each
--schedule: load the base, freeze it, inject adapters (triadapt.py), and train --iters steps of

    loss = task_loss + orth_reg * R_orth            # R_orth only for the triangular schedules
    lr(t) = linear warmup, then cosine decay to lr / 10, set on every param group each step
    allocator.step(t, optimizer)                    # may grow ranks; new blocks join the optimizer

then print the losses, the trainable parameters and the final rank of every adapted matrix, and
write <out-dir>/<run>/metrics.json and ckpt.pt. A checkpoint holds everything needed to continue
bit-for-bit (--resume): parameters, the growth events, optimizer and allocator state, RNG states.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import data
import triadapt
from model import GPT, GPTConfig

SCHEDULES = ("linear", "exponential", "topk", "lora", "full")
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
SHAPE_KEYS = ("arch", "task", "n_layer", "n_head", "n_embd", "block_size", "targets")


class UsageError(Exception):
    """Bad input: main() prints the message on one line and exits with status 2."""


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss): one line, exit status 1."""


def build_parser():
    p = argparse.ArgumentParser(description="TriAdaptLoRA: pretrain a small transformer, then fine-tune it through growing triangular adapters.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--schedule", default="linear", help=f"growth schedule or baseline, one of {', '.join(SCHEDULES)}; a comma-separated list runs each in turn on the same base")
    p.add_argument("--arch", default="gpt", choices=("gpt", "encoder"), help="gpt: causal decoder pretrained on next-byte prediction; encoder: bidirectional, pretrained with 15%% masked bytes")
    p.add_argument("--task", default="lm", choices=("lm", "classify"), help="lm: fine-tune on the documentation text; classify: label source snippets by package (needs --arch encoder)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto picks cuda when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bf16"), help="auto: bf16 autocast on a CUDA GPU that supports it, float32 otherwise")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (checkpoints hold the uncompiled model)")
    p.add_argument("--data", default=None, help="fine-tuning text file (default: Python's own documentation, pydoc_data.topics)")
    p.add_argument("--base-data", default=None, help="pretraining text file (default: the standard library's .py sources)")
    p.add_argument("--init-from", default=None, help="a base checkpoint to fine-tune instead of pretraining one")
    p.add_argument("--out-dir", default="out", help="where caches, the base model and each run's checkpoint and metrics go")
    p.add_argument("--pretrain-iters", type=int, default=1500, help="optimizer steps of pretraining")
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="peak learning rate of pretraining")
    p.add_argument("--iters", type=int, default=600, help="optimizer steps of fine-tuning, per schedule")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--block-size", type=int, default=128, help="context length in bytes")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-embd", type=int, default=128, help="embedding width")
    p.add_argument("--lr", type=float, default=None, help="peak fine-tuning learning rate (default: 2e-3 for adapters, 3e-4 for full)")
    p.add_argument("--lr-warmup", type=int, default=30, help="steps of linear learning-rate warmup before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the trained parameters")
    p.add_argument("--eval-interval", type=int, default=100, help="steps between validation (and checkpoint) points")
    p.add_argument("--eval-iters", type=int, default=20, help="batches per validation estimate (the same batches every time)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the model init, the batches and the adapters")
    p.add_argument("--resume", action="store_true", help="continue each schedule from <out-dir>/<run>/ckpt.pt")
    p.add_argument("--ref-rank", type=int, default=8, help="r_ref: average rank per matrix the budget allows; plain LoRA's rank; s = alpha / r_ref")
    p.add_argument("--init-rank", type=int, default=1, help="k_0: rank of every adapter at injection")
    p.add_argument("--rank-step", type=int, default=None, help="k: rank added per growth (default max(1, r_ref // 2))")
    p.add_argument("--budget", type=int, default=None, help="R_target: total rank over all matrices (default r_ref * number of matrices)")
    p.add_argument("--max-rank", type=int, default=None, help="per-matrix rank cap (default min(d_in, d_out))")
    p.add_argument("--alpha", type=float, default=16.0, help="adapter scale numerator: s = alpha / r_ref")
    p.add_argument("--warmup", type=int, default=50, help="t_w: no allocation round before this step")
    p.add_argument("--interval", type=int, default=10, help="dt: steps between allocation rounds")
    p.add_argument("--top-k", type=int, default=4, help="K_fixed of the topk schedule")
    p.add_argument("--orth-reg", type=float, default=0.1, help="lambda, the weight of the orthogonal regularizer")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated linears to adapt, from {', '.join(TARGETS)}")
    p.add_argument("--probe-iters", type=int, default=200, help="classify: steps training the head alone before fine-tuning (its accuracy is 'before')")
    p.add_argument("--sample-len", type=int, default=200, help="bytes of text to sample at the end of an lm run")
    p.add_argument("--stop-after", type=int, default=None, help="save a checkpoint and stop after this fine-tuning step, as an interrupt would (to test --resume)")
    return p


# ----------------------------------------------------------------------------- checking the input

def load_checkpoint(path, what="checkpoint"):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise UsageError(f"{what} {path} is truncated or corrupt ({type(e).__name__})") from None


def validate(args):
    """Every check that can fail on the user's input, before anything is written."""
    args.schedules = [s.strip() for s in args.schedule.split(",") if s.strip()]
    bad = [s for s in args.schedules if s not in SCHEDULES] or ([] if args.schedules else [args.schedule])
    if bad:
        raise UsageError(f"unknown schedule {bad[0]!r}: choose from {', '.join(SCHEDULES)}")
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.target_list if t not in TARGETS] or ([] if args.target_list else [args.targets])
    if bad:
        raise UsageError(f"unknown target module {bad[0]!r}: choose from {', '.join(TARGETS)}")
    for name in ("iters", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_interval",
                 "eval_iters", "ref_rank", "init_rank", "interval", "top_k"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("pretrain_iters", "warmup", "lr_warmup", "probe_iters", "sample_len"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("lr", "pretrain_lr", "rank_step", "budget", "max_rank"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise UsageError(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.warmup >= args.iters:
        raise UsageError(f"--warmup {args.warmup} must be below --iters {args.iters}: no allocation round could happen")
    if args.task == "classify" and args.arch != "encoder":
        raise UsageError("--task classify needs --arch encoder")
    if args.init_rank > args.n_embd:
        raise UsageError(f"--init-rank {args.init_rank} exceeds the smallest adapted dimension, --n-embd {args.n_embd}")
    n_matrices = args.n_layer * len(args.target_list)
    args.budget_total = args.budget or args.ref_rank * n_matrices
    if args.init_rank * n_matrices > args.budget_total:
        raise UsageError(f"budget {args.budget_total} is below the initial total rank {args.init_rank} x {n_matrices} matrices = {args.init_rank * n_matrices}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here (try --device cpu)")
    args.device_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "bf16" and args.device_name == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bf16 is not supported on this GPU (use --dtype float32)")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device_name == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    # data files: read once here, so that a bad file costs nothing
    args.finetune_text = args.base_text = None
    for flag, attr in (("data", "finetune_text"), ("base_data", "base_text")):
        path = getattr(args, flag)
        if path is not None:
            text = data.read_text_file(path)
            data.check_length(text, args.block_size, f"data file {path}")
            setattr(args, attr, text)
    if args.init_from:
        base = load_checkpoint(args.init_from, "base checkpoint")
        if "model" not in base or "config" not in base:
            raise UsageError(f"base checkpoint {args.init_from} holds no model and config")
    if args.resume:
        for schedule in args.schedules:
            path = os.path.join(run_dir(args, schedule), "ckpt.pt")
            ckpt = load_checkpoint(path)
            if not isinstance(ckpt, dict) or "step" not in ckpt or "args" not in ckpt:
                raise UsageError(f"checkpoint {path} is not a training checkpoint")
            if ckpt["schedule"] != schedule:
                raise UsageError(f"checkpoint {path} is from schedule {ckpt['schedule']!r}, not {schedule!r}")
            for key in SHAPE_KEYS:
                if ckpt["args"].get(key) != getattr(args, key):
                    raise UsageError(f"checkpoint {path} was made with --{key.replace('_', '-')} {ckpt['args'].get(key)}, not {getattr(args, key)}")


def run_dir(args, schedule):
    return os.path.join(args.out_dir, schedule if args.task == "lm" else f"{args.task}-{schedule}")


# ----------------------------------------------------------------------------- small utilities

def atomic_save(obj, path, writer=None):
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves old or new."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            (writer or (lambda o, fh: torch.save(o, fh)))(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj, path):
    atomic_save(obj, path, lambda o, fh: fh.write(json.dumps(o, indent=1).encode()))


def get_lr(t, peak, warmup, total):
    """Linear warmup to peak over `warmup` steps, then cosine decay to peak / 10 at `total`."""
    if t <= warmup:
        return peak * t / max(1, warmup)
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return peak / 10 + (peak - peak / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state(batch_gen):
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "batch": batch_gen.get_state()}


def set_rng_state(state, batch_gen):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    batch_gen.set_state(state["batch"])


class Interrupts:
    """First Ctrl-C: finish the step, save, exit with a resume command. Second: exit at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum, frame):
        if self.requested:
            print("\nsecond interrupt: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)


def autocast(args):
    if args.dtype == "bf16":
        return torch.autocast(device_type=args.device_name, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the tasks

class LMTask:
    """Next-byte prediction on a cached corpus; evaluation uses the same windows every time."""

    def __init__(self, splits, args):
        self.splits, self.args = splits, args

    def batch(self, split, gen):
        return data.get_batch(self.splits[split], self.args.batch_size, self.args.block_size, self.args.device_name, gen)

    def loss(self, model, x, y):
        return model(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model, split):
        model.eval()
        gen = torch.Generator().manual_seed(1234)
        losses = []
        for _ in range(self.args.eval_iters):
            x, y = self.batch(split, gen)
            with autocast(self.args):
                losses.append(self.loss(model, x, y).item())
        model.train()
        return {"loss": sum(losses) / len(losses)}


class MLMTask(LMTask):
    """Masked-byte prediction for the encoder: 15% of positions, BERT's 80/10/10 replacement."""

    def batch(self, split, gen):
        x, _ = super().batch(split, gen)
        xm, targets = data.mask_tokens(x.cpu(), mask_id=256, generator=gen)
        return xm.to(x.device), targets.to(x.device)


class ClassifyTask:
    """Snippets of standard-library source labelled by package; accuracy over the whole split."""

    def __init__(self, splits, args):
        self.splits, self.args = splits, args

    def batch(self, split, gen):
        x, y = self.splits[split]
        ix = torch.randint(len(x), (self.args.batch_size,), generator=gen)
        return x[ix].to(self.args.device_name), y[ix].to(self.args.device_name)

    def loss(self, model, x, y):
        return model.classify(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model, split):
        model.eval()
        x, y = self.splits[split]
        loss, correct = 0.0, 0
        for i in range(0, len(x), 256):
            xb, yb = x[i:i + 256].to(self.args.device_name), y[i:i + 256].to(self.args.device_name)
            with autocast(self.args):
                logits, l = model.classify(xb, yb)
            loss += l.item() * len(xb)
            correct += (logits.argmax(-1) == yb).sum().item()
        model.train()
        return {"loss": loss / len(x), "acc": correct / len(x)}


def prepare_data(args):
    """The base and fine-tuning corpora as cached memmaps, plus the sha256 that names the base."""
    cache = os.path.join(args.out_dir, "data")
    holdout = data.classification_holdout_files() if args.arch == "encoder" else ()
    if args.base_text is not None:
        base_text, base_src = args.base_text, args.base_data
    else:
        base_text, base_src = data.base_corpus(exclude=holdout)
        data.check_length(base_text, args.block_size, "the standard library's sources")
    name = ("encoder-" if holdout and args.base_text is None else "") + ("base" if args.base_text is None else "base-file")
    base = data.build_cache(name, base_text, base_src, cache)
    digest = hashlib.sha256(base_text).hexdigest()
    if args.task == "classify":
        return base, data.classification_splits(args.block_size), digest
    if args.finetune_text is not None:
        ft_text, ft_src = args.finetune_text, args.data
    else:
        ft_text, ft_src = data.finetune_corpus()
    return base, data.build_cache("finetune" if args.data is None else "finetune-file", ft_text, ft_src, cache), digest


# ----------------------------------------------------------------------------- pretraining

def model_config(args):
    return GPTConfig(vocab_size=257 if args.arch == "encoder" else 256, block_size=args.block_size,
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     bidirectional=args.arch == "encoder")


def pretrain(args, base_splits, digest):
    """Train the base model from scratch, or load the one saved for these settings; returns its checkpoint."""
    if args.init_from:
        return load_checkpoint(args.init_from, "base checkpoint")
    config = model_config(args)
    key = json.dumps({"config": asdict(config), "data": digest, "iters": args.pretrain_iters, "lr": args.pretrain_lr,
                      "batch": args.batch_size, "seed": args.seed}, sort_keys=True)
    path = os.path.join(args.out_dir, "base", hashlib.sha256(key.encode()).hexdigest()[:12] + ".pt")
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "base checkpoint")
        print(f"base model: reusing {path} (val loss {ckpt['val_loss']:.4f})")
        return ckpt
    torch.manual_seed(args.seed)
    model = GPT(config).to(args.device_name)
    task = (MLMTask if args.arch == "encoder" else LMTask)(base_splits, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    trained = torch.compile(model) if args.compile else model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining a {n_params / 1e6:.2f}M-parameter {args.arch} on {args.pretrain_iters} x {args.batch_size} x {args.block_size} bytes")
    bar = tqdm(range(1, args.pretrain_iters + 1), desc="pretrain", dynamic_ncols=True, disable=None)
    with Interrupts() as stop:
        for t in bar:
            lr = get_lr(t, args.pretrain_lr, min(100, args.pretrain_iters // 10), args.pretrain_iters)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = task.batch("train", gen)
            with autocast(args):
                loss = task.loss(trained, x, y)
            if not torch.isfinite(loss):
                raise TrainingError(f"pretraining loss is {loss.item()} at step {t}; try a lower --pretrain-lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if t % 50 == 0 or t == 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if stop.requested:
                raise TrainingError(f"pretraining interrupted at step {t}; no base model saved: the next run pretrains again")
    val = task.evaluate(model, "val")["loss"]
    ckpt = {"model": model.state_dict(), "config": asdict(config), "args": public_args(args), "val_loss": val, "key": key}
    atomic_save(ckpt, path)
    print(f"base model: val loss {val:.4f}, saved to {path}")
    return ckpt


# ----------------------------------------------------------------------------- fine-tuning

def public_args(args):
    return {k: v for k, v in vars(args).items() if k not in ("finetune_text", "base_text")}


def build_finetune_model(args, schedule, base_ckpt, n_classes):
    """The base with its method applied: (model, adapter layers, trainable parameters)."""
    config = GPTConfig(**{**base_ckpt["config"], "n_classes": n_classes})
    torch.manual_seed(args.seed)
    model = GPT(config)
    missing, unexpected = model.load_state_dict(base_ckpt["model"], strict=False)
    if unexpected or any(not k.startswith("cls_head") for k in missing):
        raise UsageError(f"base checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    model.to(args.device_name)
    layers = {}
    if schedule == "full":
        pass
    elif schedule == "lora":
        layers = triadapt.inject(model, args.target_list, layer_cls=triadapt.LoRALinear, rank=args.ref_rank, alpha=args.alpha)
    else:
        layers = triadapt.inject(model, args.target_list, rank=args.init_rank, alpha=args.alpha, ref_rank=args.ref_rank)
    if model.cls_head is not None:  # the head is new, so it trains in every schedule
        model.cls_head.requires_grad_(True)
    return model, layers, [p for p in model.parameters() if p.requires_grad]


def rank_table(layers):
    """Final ranks as text: layers as rows, module kinds as columns."""
    kinds = [k for k in TARGETS if any(n.endswith("." + k) for n in layers)]
    rows = sorted({int(n.split(".")[1]) for n in layers})
    lines = ["layer " + " ".join(f"{k:>8}" for k in kinds)]
    for i in rows:
        cells = [layers.get(f"blocks.{i}.{'attn' if k in TARGETS[:4] else 'mlp'}.{k}") for k in kinds]
        lines.append(f"{i:>5} " + " ".join(f"{c.rank if c is not None else '-':>8}" for c in cells))
    return "\n".join(lines)


def finetune(args, schedule, base_ckpt, task, n_classes=0):
    """Fine-tune one schedule to --iters steps (or from its checkpoint); returns its metrics."""
    folder = run_dir(args, schedule)
    ckpt_path = os.path.join(folder, "ckpt.pt")
    model, layers, params = build_finetune_model(args, schedule, base_ckpt, n_classes)
    lr = args.lr or (3e-4 if schedule == "full" else 2e-3)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    allocator = None
    if schedule in triadapt.SCHEDULES:
        allocator = triadapt.RankAllocator(layers, total_steps=args.iters, target_total_rank=args.budget_total,
                                           schedule=schedule, warmup=args.warmup, interval=args.interval,
                                           rank_step=args.rank_step, top_k=args.top_k, max_rank=args.max_rank)
    batch_gen = torch.Generator().manual_seed(args.seed)
    trained = torch.compile(model) if args.compile else model
    start, history, seconds, before = 0, [], 0.0, {}
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        if allocator is not None:
            allocator.load_state_dict(ckpt["allocator"], optimizer)  # shapes and param groups first
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], batch_gen)
        start, history, seconds, before = ckpt["step"], ckpt["history"], ckpt["seconds"], ckpt["before"]
        print(f"[{schedule}] resumed from {ckpt_path} at step {start}")
    else:
        if n_classes and args.probe_iters:
            before = linear_probe(args, model, task, batch_gen)
        else:
            before = task.evaluate(model, "val")
    print(f"[{schedule}] {sum(p.numel() for p in params):,} trainable parameters; val before: "
          + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))

    def save(t):
        atomic_save({"args": public_args(args), "schedule": schedule, "model_config": asdict(model.config),
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "allocator": allocator.state_dict() if allocator else None,
                     "rank_pattern": {n: list(getattr(l, "block_sizes", [l.rank])) for n, l in layers.items()},
                     "step": t, "rng": rng_state(batch_gen), "history": history,
                     "seconds": seconds + time.time() - t0, "before": before}, ckpt_path)
        return ckpt_path

    t0, last_good = time.time(), (ckpt_path if args.resume else None)
    bar = tqdm(range(start + 1, args.iters + 1), initial=start, total=args.iters, desc=schedule, dynamic_ncols=True, disable=None)
    with Interrupts() as stop:
        for t in bar:
            for g in optimizer.param_groups:  # groups added by growth follow the same schedule
                g["lr"] = get_lr(t, lr, args.lr_warmup, args.iters)
            x, y = task.batch("train", batch_gen)
            with autocast(args):
                loss = task.loss(trained, x, y)
                total = loss + args.orth_reg * triadapt.orthogonal_penalty(layers) if allocator and args.orth_reg else loss
            if not torch.isfinite(total):
                raise TrainingError(f"[{schedule}] loss is {total.item()} at step {t}; last good checkpoint: {last_good or 'none yet'}")
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if allocator is not None:
                if allocator.step(t, optimizer):
                    params = [p for g in optimizer.param_groups for p in g["params"]]
            rank = allocator.total_rank if allocator else sum(l.rank for l in layers.values())
            entry = {"step": t, "train_loss": loss.item(), "total_rank": rank}
            if t % args.eval_interval == 0 or t == args.iters:
                entry["val_loss"] = task.evaluate(model, "val")["loss"]
                last_good = save(t)
            history.append(entry)
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}", rank=rank)
            if stop.requested or t == args.stop_after:
                path = save(t)
                cmd = " ".join(shlex.quote(a) for a in resume_argv())
                print(f"[{schedule}] stopped after step {t}; checkpoint {path}\nresume with: python {cmd} --resume", flush=True)
                raise SystemExit(130 if stop.requested else 0)
    seconds += time.time() - t0
    events = allocator.events if allocator else []
    return report(args, schedule, model, layers, params, task, before, history, seconds, folder, events)


def linear_probe(args, model, task, gen):
    """Train the classification head alone on the frozen base: the 'before' accuracy of every schedule."""
    head = torch.optim.AdamW(model.cls_head.parameters(), lr=1e-2)
    for t in tqdm(range(1, args.probe_iters + 1), desc="head only", dynamic_ncols=True, disable=None):
        x, y = task.batch("train", gen)
        with torch.no_grad(), autocast(args):
            h = model.hidden(x).mean(dim=1)  # the base is frozen: no graph through it
        loss = torch.nn.functional.cross_entropy(model.cls_head(h.float()), y)
        loss.backward()
        head.step()
        head.zero_grad(set_to_none=True)
    return task.evaluate(model, "val")


def resume_argv():
    argv, out, skip = sys.argv, [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-after":
            skip = True
        elif not a.startswith("--stop-after=") and a != "--resume":
            out.append(a)
    return out


def report(args, schedule, model, layers, params, task, before, history, seconds, folder, events):
    val, test = task.evaluate(model, "val"), task.evaluate(model, "test")
    metrics = {"schedule": schedule, "val_loss_before": before["loss"], "val_loss": val["loss"], "test_loss": test["loss"],
               "trainable_params": sum(p.numel() for p in params),
               "rank_pattern": {n: l.rank for n, l in layers.items()}, "total_rank": sum(l.rank for l in layers.values()),
               "block_sizes": {n: list(l.block_sizes) for n, l in layers.items() if hasattr(l, "block_sizes")},
               "growth_events": events, "seconds": seconds, "config": public_args(args), "history": history}
    if "acc" in val:
        metrics.update(val_acc_before=before["acc"], val_acc=val["acc"], test_acc=test["acc"])
    save_json(metrics, os.path.join(folder, "metrics.json"))
    print(f"\n[{schedule}] val loss {before['loss']:.4f} -> {val['loss']:.4f} (test {test['loss']:.4f})"
          + (f", val acc {before['acc']:.3f} -> {val['acc']:.3f} (test {test['acc']:.3f})" if "acc" in val else "")
          + f"; {metrics['trainable_params']:,} trainable parameters; {seconds:.1f} s")
    if layers:
        print(f"final ranks (total {metrics['total_rank']}):\n{rank_table(layers)}")
    if args.task == "lm" and args.arch == "gpt" and args.sample_len:
        gen = torch.Generator(device=args.device_name).manual_seed(args.seed)
        prompt = torch.tensor([data.encode("The ")], device=args.device_name)
        model.eval()
        with autocast(args):
            out = model.generate(prompt, args.sample_len, temperature=0.8, top_k=50, generator=gen)
        print("sample:\n" + data.decode(out[0].tolist()))
    return metrics


def comparison_table(results):
    has_acc = any("val_acc" in m for m in results)
    head = f"{'schedule':<12} {'val before':>10} {'val after':>10} {'test':>8}" + (f" {'val acc':>8} {'test acc':>8}" if has_acc else "") + f" {'trainable':>10} {'rank':>6} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for m in results:
        acc = f" {m['val_acc']:>8.3f} {m['test_acc']:>8.3f}" if has_acc else ""
        lines.append(f"{m['schedule']:<12} {m['val_loss_before']:>10.4f} {m['val_loss']:>10.4f} {m['test_loss']:>8.4f}{acc} "
                     f"{m['trainable_params']:>10,} {m['total_rank'] if m['rank_pattern'] else '-':>6} {m['seconds']:>8.1f}")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        base_splits, ft_splits, digest = prepare_data(args)
        base_ckpt = pretrain(args, base_splits, digest)
        if args.task == "classify":
            task, n_classes = ClassifyTask(ft_splits, args), len(data.CLASS_PACKAGES)
        else:  # an encoder sees the future, so on text it can only learn masked bytes
            task, n_classes = (MLMTask if args.arch == "encoder" else LMTask)(ft_splits, args), 0
        results = [finetune(args, s, base_ckpt, task, n_classes) for s in args.schedules]
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if len(results) > 1:
        print("\n" + comparison_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
