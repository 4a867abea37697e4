"""
Pretrain a small transformer, then fine-tune it through growing triangular adapters.

    python train.py                                    # CPU-sized defaults, a few minutes on 2 cores
    python train.py --schedule linear --device cuda    # the same run on a GPU
    python train.py --schedule linear,lora,full --iters 200   # several methods, one comparison table
    python train.py --schedule linear,adalora,increlora       # the paper's competitors
    python train.py --core diagonal --importance sensitivity  # TriAdaptLoRA without its two ideas
    python train.py --arch encoder --task cola         # BERT-style encoder: cola, pairs or package
    torchrun --standalone --nproc_per_node=2 train.py  # the same run on 2 processes (DDP)

The flow: (1) read, check and cache the two corpora (data.py); (2) pretrain a base model on the
base corpus, or reuse the one saved under --out-dir/base for the same settings; (3) for each
--schedule: load the base, freeze it, inject adapters (triadapt.py), and train --iters steps of

    loss = task_loss + orth_reg * R_orth            # R_orth only for the triangular schedules
    lr(t) = linear warmup, then cosine decay to lr / 10, set on every param group each step
    optimizer.step(); allocator.update_and_allocate(t)   # may grow ranks, in place: nothing is rebuilt

then print the losses, the trainable parameters and the final rank of every adapted matrix, and
write <out-dir>/<run>/metrics.json, report.svg and adapter.pt (report.py) and ckpt.pt; several
schedules also get one picture side by side, <out-dir>/comparison.svg. Pretraining and
fine-tuning share one loop (train_loop), which checkpoints every --eval-interval steps; a
checkpoint holds everything needed to continue bit-for-bit (--resume): parameters, growth events,
optimizer and allocator state, RNG states and the history so far.

Several processes (torchrun): --batch-size is the global batch. Every process draws the same
global batch and trains on its own 1/N of it, in --grad-accum micro-steps, each weighted by its
share of the batch's targets, so gradients, growth decisions and logged losses equal one process's
up to the order of float sums.
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import adapters
import baselines
import data
import gpt2
import tasks
import options
import plot
import triadapt
from model import GPT, GPTConfig
from options import UsageError, load_checkpoint, public_args, run_dir
from report import atomic_save, comparison_table, report, save_text, state_fingerprint


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss): one line, exit status 1."""


# ----------------------------------------------------------------------------- small utilities

def get_lr(t, peak, warmup, total):
    """Linear warmup to peak over `warmup` steps, then cosine decay to peak / 10 at `total`."""
    if t <= warmup:
        return peak * t / max(1, warmup)
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return peak / 10 + (peak - peak / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, lr, weight_decay):
    """AdamW, fused into one kernel per param group where this torch supports it (CPU and CUDA)."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def rng_state(batch_gen):
    """Every generator's state as tensors and plain values: a checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "batch": batch_gen.get_state()}


def set_rng_state(state, batch_gen):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    batch_gen.set_state(state["batch"])


def resume_command(argv, prog="train.py"):
    """The command line that continues this one: the same flags, --resume, no --stop-after."""
    out, skip = [prog], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-after":
            skip = True
        elif not a.startswith("--stop-after=") and a != "--resume":
            out.append(a)
    return "python " + " ".join(shlex.quote(a) for a in out + ["--resume"])


class Interrupts:
    """Ctrl-C (or SIGTERM, as torchrun sends on shutdown): finish the step, save, exit with a resume
    command. A second Ctrl-C exits at once. Under torchrun the processes agree on the step to stop at."""

    def __init__(self, procs):
        self.procs, self.requested = procs, False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        # torchrun passes on the Ctrl-C its workers already got: only a later second one means "now"
        if self.requested and signum == signal.SIGINT and time.time() - self.first > 1.0:
            print("\nsecond interrupt: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        if not self.requested and self.procs.master:
            print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)",
                  file=sys.stderr, flush=True)
        if not self.requested:
            self.requested, self.first = True, time.time()

    def agreed(self):
        """True on every process when any process was interrupted (a CPU all-reduce: no device sync)."""
        if self.procs.world == 1:
            return self.requested
        flag_ = torch.tensor([int(self.requested)])
        dist.all_reduce(flag_, op=dist.ReduceOp.MAX, group=self.procs.ctrl)
        return bool(flag_.item())


# ----------------------------------------------------------------------------- several processes

@dataclass
class Procs:
    """This process's place under torchrun (rank 0 of 1 without it)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ctrl: object = None  # a gloo group for small CPU messages (stop flags, growth norms)

    @property
    def master(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier(group=self.ctrl)

    def mean_over_processes(self, tensors):
        """The allocator's reduce: IncreLoRA's dL/ddW of each process's share, averaged as DDP does."""
        for t in tensors:
            dist.all_reduce(t)
            t /= self.world

    def broadcast_norms(self, norms):
        """The allocator's sync: every process scores the norms that rank 0 measured."""
        if all(torch.is_tensor(v) for v in norms.values()):  # AdaLoRA's per-triplet scores
            flat = torch.cat([v.reshape(-1) for v in norms.values()]).double().cpu()
            dist.broadcast(flat, src=0, group=self.ctrl)
            parts = flat.split([v.numel() for v in norms.values()])
            return {n: p.to(v.device, v.dtype).view_as(v) for (n, v), p in zip(norms.items(), parts)}
        values = torch.tensor([norms[n] for n in norms], dtype=torch.float64)
        dist.broadcast(values, src=0, group=self.ctrl)
        return dict(zip(norms, values.tolist()))


def start_processes(args):
    if args.world == 1:
        return Procs()
    cuda = args.device_name.startswith("cuda")
    if cuda:
        torch.cuda.set_device(args.local_rank)
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    return Procs(dist.get_rank(), dist.get_world_size(), args.local_rank, ctrl)


def check_in_sync(model, procs, where):
    """Every process must hold bitwise the same parameters; a drift is a bug, so stop loudly."""
    if procs.world == 1:
        return
    digests = [None] * procs.world
    dist.all_gather_object(digests, state_fingerprint(dict(model.named_parameters())), group=procs.ctrl)
    if len(set(digests)) > 1:
        raise TrainingError(f"{where}: the processes' parameters differ (digests {sorted(set(digests))})")


# ----------------------------------------------------------------------------- the training loop

@dataclass
class Run:
    """One training run (pretraining, or one schedule's fine-tune): what the loop needs and what its
    checkpoint holds."""
    name: str
    model: torch.nn.Module            # the plain model: what is saved and evaluated
    task: object
    optimizer: torch.optim.Optimizer
    peak_lr: float
    lr_warmup: int
    iters: int
    ckpt_path: str
    batch_gen: torch.Generator
    layers: dict = field(default_factory=dict)
    allocator: object = None
    orth_reg: float = 0.0
    step: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # saved and restored as is (schedule, before, ...)
    last_good: str = None


class Objective(torch.nn.Module):
    """The task loss and the orthogonal penalty as one forward, so that torch.compile and DDP see the
    whole computation (ClassifyTask calls model.classify, which DDP alone would not hook)."""

    def __init__(self, model, task, layers):
        super().__init__()
        self.model, self.task = model, task
        self.adapters = list(layers.values())  # a plain list: the layers are registered once, in model

    def forward(self, x, y):
        loss = self.task.loss(self.model, x, y)
        return loss, (triadapt.orthogonal_penalty(self.adapters) if self.adapters else None)


def wrap(run, args, procs):
    """What the loop calls: built once a phase, and again only when an adapter's capacity doubled (its
    tensors were re-created). A growth writes in place, so DDP's hooks and a compiled graph stay valid:
    every mask, rank and scale a growth changes is a tensor, never a Python number in the graph."""
    step_fn = Objective(run.model, run.task, run.layers if run.orth_reg else {})
    if args.compile:
        torch._dynamo.reset()
        step_fn = torch.compile(step_fn, backend=args.compile_backend, mode=args.compile_mode)
    if procs.world > 1:
        step_fn = DDP(step_fn, device_ids=[procs.local_rank] if args.device_name.startswith("cuda") else None)
    return step_fn


def my_micro_batches(x, y, task, procs, k):
    """This process's 1/N of the global batch in k micro-batches, each with its share of the targets."""
    n = len(x) // procs.world
    x, y, total = x[procs.rank * n:(procs.rank + 1) * n], y[procs.rank * n:(procs.rank + 1) * n], task.count(y)
    m = n // k
    return [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m], task.count(y[i * m:(i + 1) * m]) / total) for i in range(k)]


class Progress:
    """A bar on a terminal; otherwise a line every --log-interval steps. Only rank 0 prints."""

    def __init__(self, run, args, procs):
        self.run, self.args, self.on = run, args, procs.master
        tty = self.on and sys.stderr.isatty()
        self.bar = tqdm(total=run.iters, initial=run.step, desc=run.name, dynamic_ncols=True) if tty else None
        self.reset_clock(run.step)

    def reset_clock(self, step):
        self.t_last, self.step_last = time.time(), step

    def step(self):
        if self.bar is not None:
            self.bar.update()

    def log(self, t, lr):
        """Called after the losses up to step t were read back, so the times are real on a GPU too."""
        now = time.time()
        n, dt = t - self.step_last, max(now - self.t_last, 1e-9)
        entry = self.run.history[-1]
        rank = entry["total_rank"] if self.run.layers else "-"
        stats = dict(loss=f"{entry['train_loss']:.4f}", lr=f"{lr:.2e}", rank=rank, ms=f"{1000 * dt / max(n, 1):.1f}")
        if self.bar is not None:
            self.bar.set_postfix(stats)
        elif self.on and n and t % self.args.log_interval == 0:
            tokens = n * self.args.batch_size * self.args.block_size / dt
            print(f"[{self.run.name}] step {t}/{self.run.iters} | loss {stats['loss']} | lr {stats['lr']} | "
                  f"rank {rank} | {stats['ms']} ms/step | {tokens:,.0f} tok/s", flush=True)
        self.reset_clock(t)

    def write(self, message):
        if self.on:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def checkpoint_state(run, args, t0):
    return {"name": run.name, "args": public_args(args), "model_config": asdict(run.model.config),
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "allocator": run.allocator.state_dict() if run.allocator else None,
            "rank_pattern": {n: list(getattr(l, "block_sizes", [l.rank])) for n, l in run.layers.items()},
            "step": run.step, "rng": rng_state(run.batch_gen), "history": run.history,
            "seconds": run.seconds + time.time() - t0, **run.extra}


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def restore(run, ckpt, path):
    """Growth first (capacities and masks), then the model's and optimizer's state, then the rest."""
    if run.allocator is not None:  # it replays the growths, and puts re-created tensors in the optimizer
        run.allocator.load_state_dict(ckpt["allocator"])
    try:
        run.model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UsageError(f"checkpoint {path} does not fit this model: it was written before adapters had a fixed "
                         f"capacity and masks (start the run again without --resume)") from None
    run.optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"], run.batch_gen)
    run.step, run.history, run.seconds = ckpt["step"], ckpt["history"], ckpt["seconds"]
    run.extra = {k: ckpt.get(k, v) for k, v in run.extra.items()}
    run.last_good = path


def flush(run, pending, procs):
    """Read (loss, gradient norm) of the last steps back from the device: the loop's only regular
    host sync, once every --log-interval steps. Summed over processes, a loss is the global batch's
    mean. A non-finite gradient norm means the step wrote non-finite parameters."""
    if not pending:
        return
    values = torch.stack(pending)  # (steps, 2)
    if procs.world > 1:
        dist.all_reduce(values)
    values = values.tolist()
    entries = run.history[len(run.history) - len(values):]
    for entry, (loss, norm) in zip(entries, values):
        entry["train_loss"], entry["grad_norm"] = loss, norm / procs.world  # the norm is the same on every process
    pending.clear()
    bad = next((i for i, v in enumerate(values) if not all(map(math.isfinite, v))), None)
    if bad is not None:
        what = "loss" if not math.isfinite(values[bad][0]) else "gradient norm"
        value = values[bad][0 if what == "loss" else 1]
        raise TrainingError(f"[{run.name}] {what} is {value} at step {entries[bad]['step']} "
                            f"(steps {entries[0]['step']}..{entries[-1]['step']} read back); "
                            f"last good checkpoint: {run.last_good or 'none yet'}")


def forward_backward(step_fn, run, args, procs, autocast):
    """This process's share of one global batch, in --grad-accum micro-steps; returns the batch's loss."""
    x, y = run.task.batch("train", run.batch_gen)  # the global batch, alike on every process
    step_loss = 0.0
    for i, (xm, ym, share) in enumerate(my_micro_batches(x, y, run.task, procs, args.grad_accum)):
        last = i == args.grad_accum - 1
        with step_fn.no_sync() if procs.world > 1 and not last else contextlib.nullcontext():
            with autocast:
                loss, penalty = step_fn(data.to_device(xm, args.device_name), data.to_device(ym, args.device_name))
            # DDP averages gradients over processes; the shares sum to 1 over all of them
            objective = loss * (share * procs.world)
            if penalty is not None:
                objective = objective + run.orth_reg * penalty / args.grad_accum
            objective.backward()
        step_loss = step_loss + loss.detach().float() * share
    return step_loss


def stop_here(run, args, t0, procs, stop, progress):
    """Save and exit, after an interrupt (status 130) or at --stop-after (status 0)."""
    path = save(run, args, t0, procs)
    progress.close()
    if procs.master:
        print(f"[{run.name}] stopped after step {run.step}; checkpoint {path}\n"
              f"resume with: {args.resume_command}", flush=True)
    procs.barrier()
    raise SystemExit(130 if stop.requested else 0)


def train_loop(run, args, procs):
    """Steps run.step + 1 .. run.iters, each: lr, forward/backward, clip, step, grow, log/eval/checkpoint."""
    model, opt, autocast = run.model, run.optimizer, tasks.amp(args.device_name, args.dtype)
    params = trainable(model)  # the same tensors all run long, unless a capacity doubles
    step_fn, pending, t0 = wrap(run, args, procs), [], time.time()
    progress = Progress(run, args, procs)
    with Interrupts(procs) as stop:
        for t in range(run.step + 1, run.iters + 1):
            # lr: a pure function of the step, set on every param group
            lr = get_lr(t, run.peak_lr, run.lr_warmup, run.iters)
            for g in opt.param_groups:
                g["lr"] = lr
            # forward/backward, clip, step
            step_loss = forward_backward(step_fn, run, args, procs, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            # grow: after the step, before zero_grad (AdaLoRA reads this step's gradients); in place
            if run.allocator is not None and run.allocator.update_and_allocate(t):
                if run.allocator.recreated:  # a capacity doubled: the optimizer follows, the wrappers not
                    params, step_fn = trainable(model), wrap(run, args, procs)
                run.extra["max_held"] = max(run.extra.get("max_held", 0), count_held(model))
            opt.zero_grad(set_to_none=True)
            # log/eval/checkpoint: losses stay on the device until a read-back
            run.step = t
            run.history.append({"step": t, "train_loss": None, "total_rank": sum(l.rank for l in run.layers.values())})
            pending.append(torch.stack([step_loss, grad_norm.float()]))
            progress.step()
            evaluate, stopping = t % args.eval_interval == 0 or t == run.iters, stop.agreed() or t == args.stop_after
            if evaluate or stopping or t % args.log_interval == 0:
                flush(run, pending, procs)
                progress.log(t, lr)
            if evaluate:
                if procs.master:
                    run.history[-1]["val_loss"] = run.task.evaluate(model, "val")["loss"]
                    progress.write(f"[{run.name}] step {t}: val loss {run.history[-1]['val_loss']:.4f}")
                run.last_good = save(run, args, t0, procs)
            if stopping:
                stop_here(run, args, t0, procs, stop, progress)
            if evaluate:
                progress.reset_clock(t)
    progress.close()
    run.seconds += time.time() - t0


def save(run, args, t0, procs):
    check_in_sync(run.model, procs, f"[{run.name}] step {run.step}")
    if procs.master:
        atomic_save(checkpoint_state(run, args, t0), run.ckpt_path)
    return run.ckpt_path


# ----------------------------------------------------------------------------- data and pretraining

def cache_corpora(args, procs, base, finetune):
    """Rank 0 writes the caches while the others wait; then everyone opens them. A GPT-2 base's text is
    cached as its BPE's token ids."""
    cache, tokenizer = os.path.join(args.out_dir, "data"), tasks.tokenizer(args.init_from)
    for turn in ("master", "others"):
        if procs.master == (turn == "master"):
            base_splits = data.build_cache(base[2], base[0], base[1], cache)
            if args.task in tasks.GLUE_TASKS:
                ft_splits = finetune
            else:
                name = finetune[2] + ("-bpe" if tokenizer is not None else "")
                ft_splits = data.build_cache(name, finetune[0], finetune[1], cache, tokenizer)
        procs.barrier()
    if tokenizer is not None:  # the text's bytes were checked against the block; its tokens are fewer
        data.check_length(np.concatenate(list(ft_splits.values())), args.block_size, f"{finetune[1]} in tokens")
    return base_splits, ft_splits, hashlib.sha256(base[0]).hexdigest()


def model_config(args):
    return GPTConfig(vocab_size=257 if args.arch == "encoder" else 256, block_size=args.block_size,
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     bidirectional=args.arch == "encoder")


GPT2_FIELDS = {"gelu_approximate": GPTConfig.gelu_approximate, "ln_eps": GPTConfig.ln_eps}


def pretrain(args, procs, base_splits, digest):
    """Train the base model from scratch (continuing an interrupted pretraining of the same settings),
    or load the one saved for these settings; returns its checkpoint, with its file's path as "path"."""
    if gpt2.is_folder(args.init_from):  # a GPT-2 folder: its weights, read from safetensors
        try:
            model = gpt2.from_pretrained(args.init_from)
        except gpt2.GPT2Error as e:
            raise UsageError(str(e)) from None
        return {"model": model.state_dict(), "config": asdict(model.config), "path": args.init_from}
    if args.init_from:
        return {**load_checkpoint(args.init_from, "base checkpoint"), "path": args.init_from}
    config = model_config(args)
    # GPT-2's options (gelu_approximate, ln_eps) at their defaults stay out of the key: the bases cached
    # before they existed are found again
    fields = {k: v for k, v in asdict(config).items() if k not in GPT2_FIELDS or v != GPT2_FIELDS[k]}
    key = json.dumps({"config": fields, "data": digest, "iters": args.pretrain_iters, "lr": args.pretrain_lr,
                      "batch": args.batch_size, "seed": args.seed}, sort_keys=True)
    path = os.path.join(args.out_dir, "base", hashlib.sha256(key.encode()).hexdigest()[:12] + ".pt")
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "base checkpoint")
        if procs.master:
            print(f"base model: reusing {path} (val loss {ckpt['val_loss']:.4f})")
        return {**ckpt, "path": path}
    torch.manual_seed(args.seed)
    model = GPT(config).to(args.device_name)
    task = (tasks.MLMTask if args.arch == "encoder" else tasks.LMTask)(base_splits, args)
    run = Run("pretrain", model, task, make_optimizer(model.parameters(), args.pretrain_lr, 0.1), args.pretrain_lr,
              min(100, args.pretrain_iters // 10), args.pretrain_iters, path.replace(".pt", ".partial.pt"),
              torch.Generator().manual_seed(args.seed), extra={"key": key})
    if os.path.exists(run.ckpt_path):
        restore(run, load_checkpoint(run.ckpt_path), run.ckpt_path)
        if procs.master:
            print(f"pretraining: continuing from step {run.step} ({run.ckpt_path})")
    elif procs.master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pretraining a {n_params / 1e6:.2f}M-parameter {args.arch} on "
              f"{args.pretrain_iters} x {args.batch_size} x {args.block_size} bytes")
    train_loop(run, args, procs)
    ckpt = {"model": model.state_dict(), "config": asdict(config), "args": public_args(args), "key": key,
            "val_loss": run.history[-1].get("val_loss") if run.history else task.evaluate(model, "val")["loss"]}
    if procs.master:
        atomic_save(ckpt, path)
        os.remove(run.ckpt_path) if os.path.exists(run.ckpt_path) else None
        print(f"base model: val loss {ckpt['val_loss']:.4f}, saved to {path}")
    procs.barrier()
    return {**ckpt, "path": path}


# ----------------------------------------------------------------------------- fine-tuning

def build_finetune_model(args, schedule, base_ckpt, n_classes):
    """The base with its method applied: (model, adapter layers)."""
    config = GPTConfig(**{**base_ckpt["config"], "n_classes": n_classes})
    torch.manual_seed(args.seed)
    model = GPT(config)
    # a merged classifier (sample.py --export) brings its trained head: the run trains a new one instead
    base_state = {k: v for k, v in base_ckpt["model"].items() if not k.startswith("cls_head.")}
    mismatch = options.key_mismatch([k for k in model.state_dict() if not k.startswith("cls_head")], base_state.keys())
    if mismatch:
        raise UsageError(f"base checkpoint does not fit the model: {mismatch}")
    model.load_state_dict(base_state, strict=False)  # the classification head is new
    model.to(args.device_name)
    layers = {}
    kind, layer_options, _ = method(args, schedule)
    if kind is not None:
        layers = triadapt.inject(model, args.target_list, layer_cls=kind.layer_cls, **layer_options)
    if model.cls_head is not None:  # the head is new, so it trains in every schedule
        model.cls_head.requires_grad_(True)
    return model, layers


def method(args, schedule):
    """(adapters.Kind, the layer's options, the allocator's options) of a schedule: the one place that
    turns a schedule's name into an adapter kind; (None, {}, {}) for full fine-tuning."""
    common = dict(total_steps=args.iters, target_total_rank=args.budget_total, interval=args.interval)
    if schedule == "full":
        return None, {}, {}
    if schedule == "lora":
        return adapters.KINDS["lora"], dict(rank=args.ref_rank, alpha=args.alpha), {}
    if schedule == "adalora":
        return adapters.KINDS["adalora"], dict(rank=args.adalora_rank, alpha=args.alpha, ref_rank=args.ref_rank), \
            dict(init_warmup=args.warmup, final_warmup=args.adalora_final, **common)
    g = growth_options(args, schedule)
    layer = dict(rank=args.init_rank, alpha=args.alpha, ref_rank=args.ref_rank)
    common.update(schedule=g["schedule"], warmup=args.warmup, rank_step=args.rank_step, top_k=args.top_k,
                  max_rank=args.max_rank)
    if g["plain"]:
        return adapters.KINDS["triadapt"], layer, common
    return adapters.KINDS["increlora"], dict(layer, core=g["core"], advance=g["advance"]), \
        dict(common, importance=g["importance"], block_warmup=g["block_warmup"])


def growth_options(args, schedule):
    """How a growing schedule grows. increlora is TriAdaptLoRA's allocator with IncreLoRA's choices:
    a diagonal core, sensitivity importance, the top --top-k matrices every round, a warmup for
    every new block and advance learning."""
    if schedule == "increlora":
        g = dict(schedule="topk", core="diagonal", importance="sensitivity", advance=args.rank_step_k,
                 block_warmup=10 if args.block_warmup is None else args.block_warmup)
    else:
        g = dict(schedule=schedule, core=args.core, importance=args.importance,
                 advance=args.rank_step_k if args.advance else 0, block_warmup=args.block_warmup or 0)
    # TriAdaptLoRA itself needs none of baselines.py's switches
    g["plain"] = (g["core"], g["importance"], g["advance"], g["block_warmup"]) == ("triangular", "frobenius", 0, 0)
    return g


def make_allocator(args, procs, schedule, layers, optimizer):
    """The allocator of a schedule that changes ranks while it trains (None for lora and full); it keeps
    `optimizer` right when a growth re-creates tensors."""
    kind, _, options_ = method(args, schedule)
    if kind is None or kind.allocator_cls is None:
        return None
    sync = procs.broadcast_norms if procs.world > 1 else None
    if kind.allocator_cls is baselines.IncreLoRAAllocator:  # dL/ddW of each process's share, averaged
        options_["reduce"] = procs.mean_over_processes if procs.world > 1 else None
    return kind.allocator_cls(layers, sync=sync, optimizer=optimizer, **options_)


def count_held(model):
    """Trainable numbers held right now: as count_trainable, but an AdaLoRA layer holds all its triplets,
    pruned or not (they train and may come back until the rank pattern is fixed)."""
    extra = sum(m.n_held - m.n_trainable for m in model.modules() if hasattr(m, "n_held"))
    return triadapt.count_trainable(model) + extra


def finetune(args, procs, schedule, base_ckpt, task, n_classes=0):
    """Fine-tune one schedule to --iters steps (or from its checkpoint); returns its metrics."""
    folder = run_dir(args, schedule)
    if args.status[schedule] == "done":
        if procs.master:
            print(f"[{schedule}] finished earlier: keeping {os.path.join(folder, 'metrics.json')}")
        with open(os.path.join(folder, "metrics.json")) as f:
            return json.load(f)
    model, layers = build_finetune_model(args, schedule, base_ckpt, n_classes)
    lr = args.lr or (3e-4 if schedule == "full" else 2e-3)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr, args.weight_decay)
    allocator = make_allocator(args, procs, schedule, layers, optimizer)
    name = options.run_name(args, schedule)
    run = Run(name, model, task, optimizer, lr, args.lr_warmup, args.iters, os.path.join(folder, "ckpt.pt"),
              torch.Generator().manual_seed(args.seed), layers, allocator, args.orth_reg if allocator else 0.0,
              extra={"schedule": schedule, "before": None, "max_held": count_held(model)})
    if args.status[schedule] == "resume":
        restore(run, load_checkpoint(run.ckpt_path), run.ckpt_path)
        if procs.master:
            print(f"[{schedule}] resumed from {run.ckpt_path} at step {run.step}")
    elif n_classes and args.probe_iters:
        run.extra["before"] = linear_probe(args, procs, model, task, run.batch_gen)
    else:
        run.extra["before"] = task.evaluate(model, "val") if procs.master else None
    if procs.master:
        print(f"[{schedule}] {triadapt.count_trainable(model):,} trainable parameters; val before: "
              + ", ".join(f"{k} {v:.4f}" for k, v in run.extra["before"].items() if not k.startswith("test_")))
    train_loop(run, args, procs)
    check_in_sync(model, procs, f"[{schedule}] end")
    return report(args, run, folder, base_ckpt) if procs.master else None


def linear_probe(args, procs, model, task, gen):
    """Train the classification head alone on the frozen base: the 'before' accuracy of every schedule.
    Every process trains it on the whole batch, so the heads stay identical without communication."""
    head = torch.optim.AdamW(model.cls_head.parameters(), lr=1e-2)
    autocast = tasks.amp(args.device_name, args.dtype)
    quiet = not (procs.master and sys.stderr.isatty())
    for _ in tqdm(range(args.probe_iters), desc="head only", dynamic_ncols=True, disable=quiet):
        x, y = (data.to_device(t, args.device_name) for t in task.batch("train", gen))
        with torch.no_grad(), autocast:
            h = model.hidden(x).mean(dim=1)  # (B, C); the base is frozen: no graph through it
        loss = torch.nn.functional.cross_entropy(model.cls_head(h.float()), y)
        loss.backward()
        head.step()
        head.zero_grad(set_to_none=True)
    if not procs.master:
        return None
    test = task.evaluate(model, "test")  # the probe is a row of the benchmark's tables: its test split too
    return {**task.evaluate(model, "val"), **{f"test_{k}": v for k, v in test.items()}}


def setup(argv):
    """Parse, check, read the data and create --out-dir: the part that may fail on bad input."""
    args = options.build_parser().parse_args(argv)
    options.validate(args, options.explicit_flags(argv))
    args.resume_command = resume_command(argv)
    corpora = tasks.read_corpora(args)
    options.make_out_dir(args)
    return args, corpora


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    procs, master = None, os.environ.get("RANK", "0") == "0"
    try:
        args, corpora = setup(argv)
        procs = start_processes(args)
        if args.device_name.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        base_splits, ft_splits, digest = cache_corpora(args, procs, *corpora)
        base_ckpt = pretrain(args, procs, base_splits, digest)
        if args.task in tasks.GLUE_TASKS:
            task = tasks.GLUE_TASK_CLASSES[args.task](ft_splits, args)
            n_classes = task.n_classes
        else:  # an encoder sees the future, so on text it can only learn masked bytes
            task, n_classes = (tasks.MLMTask if args.arch == "encoder" else tasks.LMTask)(ft_splits, args), 0
        results = [finetune(args, procs, s, base_ckpt, task, n_classes) for s in args.schedules]
    except (UsageError, data.DataError) as e:
        if master:  # every process checks the same input: one of them says so
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if master:
            print(f"\ninterrupted; resume with: {resume_command(argv)}", file=sys.stderr)
        return 130
    finally:
        if procs is not None and procs.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if len(results) > 1 and procs.master:
        print("\n" + comparison_table(results))
        path = run_dir(args, "comparison") + ".svg"  # named like the runs' folders: out/cola-comparison.svg
        save_text(plot.comparison({m.get("run", m["schedule"]): [m] for m in results}), path)
        print(f"picture: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
