"""
Pretrain a small transformer, then fine-tune it through growing triangular adapters.

    python train.py                                    # CPU-sized defaults, a few minutes on 2 cores
    python train.py --schedule linear --device cuda    # the same run on a GPU
    python train.py --schedule linear,lora,full --iters 200   # several methods, one comparison table
    python train.py --schedule linear,adalora,increlora       # the paper's competitors
    python train.py --core diagonal --importance sensitivity  # TriAdaptLoRA without its two ideas
    python train.py --arch encoder --task cola         # BERT-style encoder: cola, pairs or package
    torchrun --standalone --nproc_per_node=2 train.py  # the same run on 2 processes (DDP)

The flow: (0) resolve the command line into settings (options.py, settings.py); (1) read, check and
cache the two corpora (data.py, tasks.py); (2) pretrain a base model on the base corpus, or reuse
the one saved under --out-dir/base for the same settings (checkpoint.py); (3) for each --schedule:
load the base, freeze it, inject adapters (triadapt.py), and train --iters steps of

    loss = task_loss + orth_reg * R_orth            # R_orth only for the triangular schedules
    lr(t) = linear warmup, then cosine decay to lr / 10, set on every param group each step
    optimizer.step(); allocator.update_and_allocate(t)   # may grow ranks, in place: nothing is rebuilt

then print the losses, the trainable parameters and the final rank of every adapted matrix, and
write <out-dir>/<run>/metrics.json, report.svg and adapter.pt (report.py) and ckpt.pt; several
schedules also get one picture side by side, <out-dir>/comparison.svg. Pretraining and
fine-tuning share one loop (train_loop), which checkpoints every --eval-interval steps; a
checkpoint holds everything needed to continue bit-for-bit (--resume): parameters, growth events,
optimizer and allocator state, RNG states and the history so far (checkpoint.py). Several
processes (torchrun) split every global batch between them (processes.py).
"""
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import baselines
import checkpoint
import data
import options
import plot
import settings
import tasks
import triadapt
from model import GPT, GPTConfig
from options import UsageError, load_checkpoint
from processes import Interrupts, TrainingError, check_in_sync, my_micro_batches, start_processes
from report import atomic_save, comparison_table, report, save_text


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
    schedule: str = None              # fine-tuning: the schedule, the metrics before it, the most
    before: dict = None               # trainable numbers held at any step (count_held)
    max_held: int = 0
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


def wrap(run, system, procs):
    """What the loop calls: built once a phase, and again only when an adapter's capacity doubled (its
    tensors were re-created). A growth writes in place, so DDP's hooks and a compiled graph stay valid:
    every mask, rank and scale a growth changes is a tensor, never a Python number in the graph."""
    step_fn = Objective(run.model, run.task, run.layers if run.orth_reg else {})
    if system.compile:
        torch._dynamo.reset()
        step_fn = torch.compile(step_fn, backend=system.compile_backend, mode=system.compile_mode)
    if procs.world > 1:
        step_fn = DDP(step_fn, device_ids=[procs.local_rank] if system.device.startswith("cuda") else None)
    return step_fn


class Progress:
    """A bar on a terminal; otherwise a line every --log-interval steps. Only rank 0 prints."""

    def __init__(self, run, s, procs):
        self.run, self.s, self.on = run, s, procs.master
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
        stats = dict(loss=f"{entry['train_loss']:.4f}", lr=f"{lr:.2e}", rank=rank,
                     ms=f"{1000 * dt / max(n, 1):.1f}")
        if self.bar is not None:
            self.bar.set_postfix(stats)
        elif self.on and n and t % self.s.run.log_interval == 0:
            tokens = n * self.s.data.batch_size * self.s.data.block_size / dt
            print(f"[{self.run.name}] step {t}/{self.run.iters} | loss {stats['loss']} | lr {stats['lr']} | "
                  f"rank {rank} | {stats['ms']} ms/step | {tokens:,.0f} tok/s", flush=True)
        self.reset_clock(t)

    def write(self, message):
        if self.on:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self):
        if self.bar is not None:
            self.bar.close()


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
        entry["train_loss"], entry["grad_norm"] = loss, norm / procs.world  # the norm is alike on every process
    pending.clear()
    bad = next((i for i, v in enumerate(values) if not all(map(math.isfinite, v))), None)
    if bad is not None:
        what = "loss" if not math.isfinite(values[bad][0]) else "gradient norm"
        value = values[bad][0 if what == "loss" else 1]
        raise TrainingError(f"[{run.name}] {what} is {value} at step {entries[bad]['step']} "
                            f"(steps {entries[0]['step']}..{entries[-1]['step']} read back); "
                            f"last good checkpoint: {run.last_good or 'none yet'}")


def train_step(step_fn, optimizer, micro, orth_reg=0.0, autocast=contextlib.nullcontext(), world=1):
    """One optimizer step, as every run (and bench.py) takes it: forward/backward over this process's
    micro-batches `micro`, [(x, y, share of the global batch's targets)] on the device, the objective
    loss + orth_reg * R_orth; gradient clipping to norm 1; AdamW. The caller sets the lr before and
    zero_grads after (the allocator reads the gradients in between). Returns the global batch's loss
    (this process's part of it) and the gradient norm, both still on the device."""
    step_loss = 0.0
    for i, (x, y, share) in enumerate(micro):
        with step_fn.no_sync() if world > 1 and i < len(micro) - 1 else contextlib.nullcontext():
            with autocast:
                loss, penalty = step_fn(x, y)
            objective = loss * (share * world)  # DDP averages over processes; the shares sum to 1 over all
            if penalty is not None:
                objective = objective + orth_reg * penalty / len(micro)
            objective.backward()
        step_loss = step_loss + loss.detach().float() * share
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return step_loss, grad_norm


def my_batch(run, s, procs):
    """This process's micro-batches of the next global batch (alike on every process), on the device."""
    x, y = run.task.batch("train", run.batch_gen)
    return [(data.to_device(xm, s.system.device), data.to_device(ym, s.system.device), share)
            for xm, ym, share in my_micro_batches(x, y, run.task, procs, s.optim.grad_accum)]


def stop_here(run, s, t0, procs, stop, progress):
    """Save and exit, after an interrupt (status 130) or at --stop-after (status 0)."""
    path = save(run, s, t0, procs)
    progress.close()
    if procs.master:
        print(f"[{run.name}] stopped after step {run.step}; checkpoint {path}\n"
              f"resume with: {s.run.resume_command}", flush=True)
    procs.barrier()
    raise SystemExit(130 if stop.requested else 0)


def train_loop(run, s, procs):
    """Steps run.step + 1 .. run.iters, each: lr, forward/backward, clip, step, grow, log/eval/checkpoint."""
    model, opt, autocast = run.model, run.optimizer, tasks.amp(s.system.device, s.system.dtype)
    step_fn, pending, t0 = wrap(run, s.system, procs), [], time.time()
    progress = Progress(run, s, procs)
    with Interrupts(procs) as stop:
        for t in range(run.step + 1, run.iters + 1):
            # lr: a pure function of the step, set on every param group
            lr = get_lr(t, run.peak_lr, run.lr_warmup, run.iters)
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss, grad_norm = train_step(step_fn, opt, my_batch(run, s, procs), run.orth_reg, autocast,
                                              procs.world)
            # grow: after the step, before zero_grad (AdaLoRA reads this step's gradients); in place
            if run.allocator is not None and run.allocator.update_and_allocate(t):
                if run.allocator.recreated:  # a capacity doubled: the optimizer follows, the wrappers not
                    step_fn = wrap(run, s.system, procs)
                run.max_held = max(run.max_held, count_held(model))
            opt.zero_grad(set_to_none=True)
            # log/eval/checkpoint: losses stay on the device until a read-back
            run.step = t
            total_rank = sum(l.rank for l in run.layers.values())
            run.history.append({"step": t, "train_loss": None, "total_rank": total_rank})
            pending.append(torch.stack([step_loss, grad_norm.float()]))
            progress.step()
            evaluate = t % s.run.eval_interval == 0 or t == run.iters
            stopping = stop.agreed() or t == s.run.stop_after
            if evaluate or stopping or t % s.run.log_interval == 0:
                flush(run, pending, procs)
                progress.log(t, lr)
            if evaluate:
                if procs.master:
                    run.history[-1]["val_loss"] = run.task.evaluate(model, "val")["loss"]
                    progress.write(f"[{run.name}] step {t}: val loss {run.history[-1]['val_loss']:.4f}")
                run.last_good = save(run, s, t0, procs)
            if stopping:
                stop_here(run, s, t0, procs, stop, progress)
            if evaluate:
                progress.reset_clock(t)
    progress.close()
    run.seconds += time.time() - t0


def save(run, s, t0, procs):
    check_in_sync(run.model, procs, f"[{run.name}] step {run.step}")
    if procs.master:
        atomic_save(checkpoint.checkpoint_state(run, s, t0), run.ckpt_path)
    return run.ckpt_path


# ----------------------------------------------------------------------------- data and pretraining

def cache_corpora(s, procs, base, finetune):
    """Rank 0 writes the caches while the others wait; then everyone opens them. A GPT-2 base's text is
    cached as its BPE's token ids."""
    cache, tokenizer = os.path.join(s.run.out_dir, "data"), tasks.tokenizer(s.model.init_from)
    for turn in ("master", "others"):
        if procs.master == (turn == "master"):
            base_splits = data.build_cache(base[2], base[0], base[1], cache)
            if s.data.task in tasks.GLUE_TASKS:
                ft_splits = finetune
            else:
                name = finetune[2] + ("-bpe" if tokenizer is not None else "")
                ft_splits = data.build_cache(name, finetune[0], finetune[1], cache, tokenizer)
        procs.barrier()
    if tokenizer is not None:  # the text's bytes were checked against the block; its tokens are fewer
        tokens = np.concatenate(list(ft_splits.values()))
        data.check_length(tokens, s.data.block_size, f"{finetune[1]} in tokens")
    return base_splits, ft_splits, hashlib.sha256(base[0]).hexdigest()


def make_task(s, splits, pretraining=False):
    """The fine-tuning task of settings `s` on `splits` (or, pretraining, the base's: next or masked
    bytes). An encoder sees the future, so on text it can only learn masked bytes."""
    where = (splits, s.data, s.system.device, s.system.dtype)
    if s.data.task in tasks.GLUE_TASKS and not pretraining:
        return tasks.GLUE_TASK_CLASSES[s.data.task](*where)
    return (tasks.MLMTask if s.model.arch == "encoder" else tasks.LMTask)(*where)


def pretrain(s, procs, base_splits, digest):
    """Train the base model from scratch (continuing an interrupted pretraining of the same settings),
    or load the one saved for these settings; returns its checkpoint, with its file's path as "path"."""
    if s.model.init_from:
        return checkpoint.given_base(s.model.init_from)
    config, key = checkpoint.model_config(s), checkpoint.base_key(s, digest)
    path = checkpoint.base_path(s, key)
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "base checkpoint")
        if procs.master:
            print(f"base model: reusing {path} (val loss {ckpt['val_loss']:.4f})")
        return {**ckpt, "path": path}
    m = s.model
    torch.manual_seed(s.optim.seed)
    model = GPT(config).to(s.system.device)
    task = make_task(s, base_splits, pretraining=True)
    run = Run("pretrain", model, task, make_optimizer(model.parameters(), m.pretrain_lr, 0.1), m.pretrain_lr,
              min(100, m.pretrain_iters // 10), m.pretrain_iters, path.replace(".pt", ".partial.pt"),
              torch.Generator().manual_seed(s.optim.seed))
    if os.path.exists(run.ckpt_path):
        checkpoint.restore(run, load_checkpoint(run.ckpt_path), run.ckpt_path)
        if procs.master:
            print(f"pretraining: continuing from step {run.step} ({run.ckpt_path})")
    elif procs.master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pretraining a {n_params / 1e6:.2f}M-parameter {m.arch} on "
              f"{m.pretrain_iters} x {s.data.batch_size} x {s.data.block_size} bytes")
    train_loop(run, s, procs)
    val_loss = run.history[-1].get("val_loss") if run.history else task.evaluate(model, "val")["loss"]
    ckpt = {"model": model.state_dict(), "config": asdict(config), "settings": s.public(), "key": key,
            "val_loss": val_loss}
    if procs.master:
        atomic_save(ckpt, path)
        os.remove(run.ckpt_path) if os.path.exists(run.ckpt_path) else None
        print(f"base model: val loss {ckpt['val_loss']:.4f}, saved to {path}")
    procs.barrier()
    return {**ckpt, "path": path}


# ----------------------------------------------------------------------------- fine-tuning

def build_finetune_model(s, schedule, base_ckpt, n_classes):
    """The base with its method applied: (model, adapter layers)."""
    config = GPTConfig(**{**base_ckpt["config"], "n_classes": n_classes})
    torch.manual_seed(s.optim.seed)
    model = GPT(config)
    # a merged classifier (sample.py --export) brings its trained head: the run trains a new one instead
    base_state = {k: v for k, v in base_ckpt["model"].items() if not k.startswith("cls_head.")}
    body = [k for k in model.state_dict() if not k.startswith("cls_head")]
    mismatch = options.key_mismatch(body, base_state.keys())
    if mismatch:
        raise UsageError(f"base checkpoint does not fit the model: {mismatch}")
    model.load_state_dict(base_state, strict=False)  # the classification head is new
    model.to(s.system.device)
    layers = {}
    kind, layer_options, _ = settings.method(s, schedule)
    if kind is not None:
        layers = triadapt.inject(model, list(s.adapter.targets), layer_cls=kind.layer_cls, **layer_options)
    if model.cls_head is not None:  # the head is new, so it trains in every schedule
        model.cls_head.requires_grad_(True)
    return model, layers


def make_allocator(s, procs, schedule, layers, optimizer):
    """The allocator of a schedule that changes ranks while it trains (None for lora and full); it keeps
    `optimizer` right when a growth re-creates tensors."""
    kind, _, allocator_options = settings.method(s, schedule)
    if kind is None or kind.allocator_cls is None:
        return None
    sync = procs.broadcast_norms if procs.world > 1 else None
    if kind.allocator_cls is baselines.IncreLoRAAllocator:  # dL/ddW of each process's share, averaged
        allocator_options["reduce"] = procs.mean_over_processes if procs.world > 1 else None
    return kind.allocator_cls(layers, sync=sync, optimizer=optimizer, **allocator_options)


def count_held(model):
    """Trainable numbers held right now: as count_trainable, but an AdaLoRA layer holds all its triplets,
    pruned or not (they train and may come back until the rank pattern is fixed)."""
    extra = sum(m.n_held - m.n_trainable for m in model.modules() if hasattr(m, "n_held"))
    return triadapt.count_trainable(model) + extra


def finetune(s, procs, schedule, status, base_ckpt, task):
    """Fine-tune one schedule to --iters steps, or on from its checkpoint (status "resume"), or keep a
    finished run (status "done"); returns its metrics."""
    folder = settings.run_dir(s, schedule)
    if status == "done":
        if procs.master:
            print(f"[{schedule}] finished earlier: keeping {os.path.join(folder, 'metrics.json')}")
        with open(os.path.join(folder, "metrics.json")) as f:
            return json.load(f)
    n_classes = getattr(task, "n_classes", 0)
    model, layers = build_finetune_model(s, schedule, base_ckpt, n_classes)
    lr = settings.peak_lr(s, schedule)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr, s.optim.weight_decay)
    allocator = make_allocator(s, procs, schedule, layers, optimizer)
    run = Run(settings.run_name(s, schedule), model, task, optimizer, lr, s.optim.lr_warmup, s.optim.iters,
              os.path.join(folder, "ckpt.pt"), torch.Generator().manual_seed(s.optim.seed), layers, allocator,
              s.adapter.orth_reg if allocator else 0.0, schedule=schedule, max_held=count_held(model))
    if status == "resume":
        checkpoint.restore(run, load_checkpoint(run.ckpt_path), run.ckpt_path)
        if procs.master:
            print(f"[{schedule}] resumed from {run.ckpt_path} at step {run.step}")
    elif n_classes and s.run.probe_iters:
        run.before = linear_probe(s, procs, model, task, run.batch_gen)
    else:
        run.before = task.evaluate(model, "val") if procs.master else None
    if procs.master:
        print(f"[{schedule}] {triadapt.count_trainable(model):,} trainable parameters; val before: "
              + ", ".join(f"{k} {v:.4f}" for k, v in run.before.items() if not k.startswith("test_")))
    train_loop(run, s, procs)
    check_in_sync(model, procs, f"[{schedule}] end")
    return report(s, run, folder, base_ckpt) if procs.master else None


def linear_probe(s, procs, model, task, gen):
    """Train the classification head alone on the frozen base: the 'before' accuracy of every schedule.
    Every process trains it on the whole batch, so the heads stay identical without communication."""
    head = torch.optim.AdamW(model.cls_head.parameters(), lr=1e-2)
    device, autocast = s.system.device, tasks.amp(s.system.device, s.system.dtype)
    quiet = not (procs.master and sys.stderr.isatty())
    for _ in tqdm(range(s.run.probe_iters), desc="head only", dynamic_ncols=True, disable=quiet):
        x, y = (data.to_device(t, device) for t in task.batch("train", gen))
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
    """Resolve the settings, read the data, see which runs to resume and create --out-dir: the part that
    may fail on bad input. Returns (settings, {schedule: status}, corpora)."""
    s = options.resolve(argv)
    corpora = tasks.read_corpora(s.data, s.model.arch)
    status = options.check_resume(s)
    options.make_out_dir(s)
    return s, status, corpora


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    procs, master = None, os.environ.get("RANK", "0") == "0"
    try:
        s, status, corpora = setup(argv)
        procs = start_processes(s.system)
        if s.system.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(s.optim.seed)
        random.seed(s.optim.seed)
        np.random.seed(s.optim.seed)
        base_splits, ft_splits, digest = cache_corpora(s, procs, *corpora)
        base_ckpt = pretrain(s, procs, base_splits, digest)
        task = make_task(s, ft_splits)
        results = [finetune(s, procs, name, status[name], base_ckpt, task) for name in s.run.schedule]
    except (UsageError, data.DataError) as e:
        if master:  # every process checks the same input: one of them says so
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if master:
            print(f"\ninterrupted; resume with: {options.resume_command(argv)}", file=sys.stderr)
        return 130
    finally:
        if procs is not None and procs.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if len(results) > 1 and procs.master:
        print("\n" + comparison_table(results))
        path = settings.run_dir(s, "comparison") + ".svg"  # like the runs' folders: out/cola-comparison.svg
        save_text(plot.comparison({m.get("run", m["schedule"]): [m] for m in results}), path)
        print(f"picture: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
