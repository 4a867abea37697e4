"""
The command line of train.py: every flag, and every check of the user's input, made before
anything is written. Bad input raises UsageError, which train.py prints as one line (exit 2).

    python train.py --help
    s = options.resolve(argv)         # settings.Settings: frozen, every default resolved
    status = options.check_resume(s)  # {schedule: "new" | "resume" | "done"}

resolve() is the one reader of the argparse namespace. It also settles what the flags leave open:
the model's shape from an --init-from base, the budget, k, AdaLoRA's start and t_f, the device and
dtype, and the place of this process under torchrun (RANK, WORLD_SIZE, LOCAL_RANK from the
environment); check_resume() says, with --resume, which runs are finished, interrupted or new.
"""
import argparse
import glob
import math
import os
import shlex

import torch

import adapters
import baselines
import bpe
import gpt2
import tasks
import triadapt
from model import GPT, GPTConfig
import settings
from settings import Settings, run_dir

SCHEDULES = ("linear", "exponential", "topk", "lora", "adalora", "increlora", "full")
TASKS = ("lm",) + tuple(tasks.GLUE_TASKS)
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
# Flags that change what a run computes: --resume refuses a checkpoint made with other values.
TRAJECTORY = ("arch", "task", "n_layer", "n_head", "n_embd", "block_size", "data", "dtype", "batch_size",
              "seed", "iters", "lr", "lr_warmup", "weight_decay", "init_from")
ADAPTER_TRAJECTORY = ("targets", "ref_rank", "alpha")                     # lora and the growing schedules
GROWTH_TRAJECTORY = ("init_rank", "rank_step", "budget", "max_rank", "warmup", "interval", "top_k",
                     "orth_reg", "core", "importance", "block_warmup", "advance")
INCRELORA_FIXED = ("core", "importance", "advance")  # increlora's own choices, whatever the flags say
ADALORA_TRAJECTORY = ("budget", "warmup", "interval", "orth_reg", "adalora_init_rank", "final_warmup")
PRETRAIN_TRAJECTORY = ("base_data", "pretrain_iters", "pretrain_lr")  # they make the base, unless --init-from
# Per architecture: the encoder's understanding tasks are learnable on 64-byte rows from a base pretrained
# 3000 steps (at 128 bytes and 1500 steps full fine-tuning stayed near chance: README, the small GLUE)
ARCH_DEFAULTS = {"gpt": {"block_size": 128, "pretrain_iters": 1500},
                 "encoder": {"block_size": 64, "pretrain_iters": 3000}}


class UsageError(Exception):
    """Bad input: main() prints the message on one line and exits with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where its help already says it or the default is None
    (a flag left unset: its help says what that means)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="TriAdaptLoRA: pretrain a small transformer, then fine-tune it through growing "
                    "triangular adapters.",
        formatter_class=HelpFormatter)
    p.add_argument("--schedule", default="linear",
                   help=f"growth schedule or baseline, one of {', '.join(SCHEDULES)}; "
                        "a comma-separated list runs each in turn on the same base")
    p.add_argument("--arch", default="gpt", choices=("gpt", "encoder"),
                   help="gpt: causal decoder pretrained on next-byte prediction; "
                        "encoder: bidirectional, pretrained with 15%% masked bytes")
    p.add_argument("--task", default="lm", choices=TASKS, metavar="{" + ",".join(TASKS) + "}",
                   help="lm: fine-tune on the documentation text; "
                        "the understanding tasks (need --arch encoder): "
                        + "; ".join(f"{k}: {v}" for k, v in tasks.GLUE_TASKS.items()))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto picks cuda when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bf16"),
                   help="auto: bf16 autocast on a CUDA GPU that supports it, float32 otherwise")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step, once a run (and once more if an adapter's capacity "
                        "doubles; a growth writes in place); checkpoints hold the uncompiled model")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager is for tests)")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode; reduce-overhead captures the step as CUDA graphs on a GPU")
    p.add_argument("--data", default=None,
                   help="fine-tuning text file (default: Python's own documentation, pydoc_data.topics)")
    p.add_argument("--base-data", default=None,
                   help="pretraining text file (default: the standard library's .py sources)")
    p.add_argument("--init-from", default=None,
                   help="a base checkpoint, or a GPT-2 folder (config.json, model.safetensors, "
                        "vocab.json, merges.txt), to fine-tune instead of pretraining one; "
                        "the model shape comes from it")
    p.add_argument("--out-dir", default="out",
                   help="where caches, the base model and each run's checkpoint and metrics go")
    p.add_argument("--pretrain-iters", type=int, default=None,
                   help="optimizer steps of pretraining (default: 1500 for gpt, 3000 for encoder)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="peak learning rate of pretraining")
    p.add_argument("--iters", type=int, default=600, help="optimizer steps of fine-tuning, per schedule")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per optimizer step, over all processes together")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-steps each process splits its share of the batch into")
    p.add_argument("--block-size", type=int, default=None,
                   help="context length in bytes (default: 128 for gpt, 64 for encoder)")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-embd", type=int, default=128, help="embedding width")
    p.add_argument("--lr", type=float, default=None,
                   help="peak fine-tuning learning rate (default: 2e-3 for adapters, 3e-4 for full)")
    p.add_argument("--lr-warmup", type=int, default=30,
                   help="steps of linear learning-rate warmup before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay of the trained parameters")
    p.add_argument("--eval-interval", type=int, default=100,
                   help="steps between validation (and checkpoint) points, in pretraining and fine-tuning")
    p.add_argument("--eval-iters", type=int, default=20,
                   help="batches per validation estimate (the same batches every time)")
    p.add_argument("--log-interval", type=int, default=10,
                   help="steps between reading the train loss back from the device "
                        "(and a log line when stdout is not a terminal)")
    p.add_argument("--seed", type=int, default=1337,
                   help="seed of the model init, the batches and the adapters")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted runs from <out-dir>/<run>/ckpt.pt, keep finished ones, "
                        "start the others")
    p.add_argument("--ref-rank", type=int, default=8,
                   help="r_ref: average rank per matrix the budget allows; plain LoRA's rank; "
                        "s = alpha / r_ref")
    p.add_argument("--init-rank", type=int, default=1, help="k_0: rank of every adapter at injection")
    p.add_argument("--rank-step", type=int, default=None,
                   help="k: rank added per growth (default max(1, r_ref // 2))")
    p.add_argument("--budget", type=int, default=None,
                   help="R_target: total rank over all matrices (default r_ref * number of matrices)")
    p.add_argument("--max-rank", type=int, default=None,
                   help="per-matrix rank cap (default min(d_in, d_out))")
    p.add_argument("--alpha", type=float, default=16.0, help="adapter scale numerator: s = alpha / r_ref")
    p.add_argument("--warmup", type=int, default=20,
                   help="t_w: no allocation round before this step (AdaLoRA: t_i, its pruning's start)")
    p.add_argument("--interval", type=int, default=5, help="dt: steps between allocation rounds")
    p.add_argument("--top-k", type=int, default=4, help="K_fixed of the topk schedule")
    p.add_argument("--core", default="triangular", choices=baselines.CORES,
                   help="ablation: the core C of the growing schedules; "
                        "diagonal is diag(lambda), as IncreLoRA's")
    p.add_argument("--importance", default="frobenius", choices=baselines.IMPORTANCES,
                   help="ablation: frobenius scores how fast ||C||_F / r moves (TriAdaptLoRA); sensitivity "
                        "the smoothed |dW * dL/ddW| x its uncertainty (IncreLoRA)")
    p.add_argument("--block-warmup", type=int, default=None,
                   help="N: a block born at step t0 trains at lr(t) * min(1, (t - t0) / N) "
                        "(default 0, off; increlora: 10)")
    p.add_argument("--advance", action="store_true",
                   help="advance learning: every matrix trains its next block ahead of time under a frozen "
                        "tiny core entry (always on for increlora)")
    p.add_argument("--adalora-init-rank", type=int, default=None,
                   help="adalora: triplets per matrix at the start (default 1.5 r_ref), pruned to the budget")
    p.add_argument("--final-warmup", type=int, default=None,
                   help="adalora: t_f, the last steps with the rank pattern fixed (default --iters // 6)")
    p.add_argument("--orth-reg", type=float, default=0.1,
                   help="lambda, the weight of the orthogonal regularizer")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated linears to adapt, from {', '.join(TARGETS)}")
    p.add_argument("--probe-iters", type=int, default=200,
                   help="understanding tasks: steps training the head alone before fine-tuning "
                        "(its metrics are 'before')")
    p.add_argument("--sample-len", type=int, default=200,
                   help="bytes of text to sample at the end of an lm run")
    p.add_argument("--stop-after", type=int, default=None,
                   help="save a checkpoint and stop after this step of each run, as an interrupt would "
                        "(to test --resume)")
    p.add_argument("--dist-timeout", type=int, default=600,
                   help="seconds a process waits for the others in a collective before failing")
    return p


def flag_defaults():
    """{flag name: its default}, as the parser holds them."""
    return {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}


def explicit_flags(argv):
    """The flags given on the command line, as argparse dests (the others hold their defaults)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------- checking the input

def load_checkpoint(path, what="checkpoint"):
    """Every file the project opens comes through here: tensors and plain data only, nothing that runs
    code when read (adapters.load_file); anything else is one line and exit 2."""
    try:
        return adapters.load_file(path, what)
    except adapters.AdapterFileError as e:
        raise UsageError(str(e)) from None


def flag(name):
    return "--" + name.replace("_", "-")


def resolve(argv):
    """The command line, checked and resolved into Settings; raises UsageError on bad input."""
    args = build_parser().parse_args(argv)
    validate(args, explicit_flags(argv))
    args.resume_command = resume_command(argv)
    return Settings.from_public(vars(args))


def validate(args, explicit=()):
    """Every check that can fail on the user's input, before anything is written; each flag left open
    gets its resolved value under its own name."""
    for name, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    schedules = tuple(s.strip() for s in args.schedule.split(",") if s.strip())
    bad = [s for s in schedules if s not in SCHEDULES] or ([] if schedules else [args.schedule])
    if bad:
        raise UsageError(f"unknown schedule {bad[0]!r}: choose from {', '.join(SCHEDULES)}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS] or ([] if targets else [args.targets])
    if bad:
        raise UsageError(f"unknown target module {bad[0]!r}: choose from {', '.join(TARGETS)}")
    args.schedule, args.targets = schedules, targets
    for name in ("iters", "batch_size", "grad_accum", "block_size", "n_layer", "n_head", "n_embd",
                 "eval_interval", "eval_iters", "log_interval", "ref_rank", "init_rank", "interval", "top_k",
                 "dist_timeout"):
        if getattr(args, name) <= 0:
            raise UsageError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("pretrain_iters", "warmup", "lr_warmup", "probe_iters", "sample_len", "block_warmup",
                 "final_warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"{flag(name)} must not be negative, got {getattr(args, name)}")
    for name in ("lr", "pretrain_lr", "alpha", "orth_reg", "weight_decay"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag(name)} must be a finite number, got {value}")
    for name in ("lr", "pretrain_lr", "alpha", "rank_step", "budget", "max_rank", "stop_after",
                 "adalora_init_rank"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("orth_reg", "weight_decay"):
        if getattr(args, name) < 0:
            raise UsageError(f"{flag(name)} must not be negative, got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    if args.init_from:
        take_shape_from_base(args, explicit)
    if args.n_embd % args.n_head:
        raise UsageError(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.warmup >= args.iters:
        raise UsageError(f"--warmup {args.warmup} must be below --iters {args.iters}: "
                         f"no allocation round could happen")
    if args.task in tasks.GLUE_TASKS and args.arch != "encoder":
        raise UsageError(f"--task {args.task} needs --arch encoder")
    if args.init_rank > args.n_embd:
        raise UsageError(f"--init-rank {args.init_rank} exceeds the smallest adapted dimension, "
                         f"--n-embd {args.n_embd}")
    n_matrices = args.n_layer * len(args.targets)
    args.budget = args.budget or triadapt.default_budget(args.ref_rank, n_matrices)
    args.rank_step = args.rank_step or triadapt.default_rank_step(args.ref_rank)
    if args.init_rank * n_matrices > args.budget:
        raise UsageError(f"budget {args.budget} is below the initial total rank {args.init_rank} x "
                         f"{n_matrices} matrices = {args.init_rank * n_matrices}")
    check_adalora(args)
    changed = (("core", args.core != "triangular"), ("importance", args.importance != "frobenius"),
               ("advance", args.advance))
    ablation = [flag(k) for k, v in changed if v]
    if ablation and not set(args.schedule) & set(triadapt.SCHEDULES):
        raise UsageError(f"{ablation[0]} changes the linear, exponential and topk schedules only "
                         f"(increlora has its own choices)")
    validate_processes(args)


def take_shape_from_gpt2(args, explicit):
    """A GPT-2 folder: its shape, its context (or a smaller --block-size), its BPE; a GPT language model."""
    try:
        cfg = gpt2.read_config(args.init_from)
        bpe.read_files(args.init_from)
    except (gpt2.GPT2Error, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if args.arch != "gpt" or args.task != "lm":
        raise UsageError(f"--init-from {args.init_from} is a GPT-2 folder: it fine-tunes --arch gpt --task lm")
    if "block_size" in explicit and args.block_size > cfg.block_size:
        raise UsageError(f"--block-size {args.block_size} exceeds the context of {args.init_from}, "
                         f"n_positions {cfg.block_size}")
    shape = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd}
    for key, value in shape.items():
        if key in explicit and getattr(args, key) != value:
            raise UsageError(f"{flag(key)} {getattr(args, key)} contradicts {args.init_from}, which has "
                             f"{key} {value} (drop the flag)")
        setattr(args, key, value)
    if "block_size" not in explicit:
        args.block_size = cfg.block_size


def take_shape_from_base(args, explicit):
    """--init-from: the model's shape is the base's; a flag that says otherwise is an error."""
    if gpt2.is_folder(args.init_from):
        return take_shape_from_gpt2(args, explicit)
    base = load_checkpoint(args.init_from, "base checkpoint")
    if not isinstance(base, dict) or "model" not in base or "config" not in base:
        raise UsageError(f"base checkpoint {args.init_from} holds no model and config")
    cfg = base["config"]
    with torch.device("meta"):  # the keys of the model this config builds, without its memory
        expected = GPT(GPTConfig(**cfg)).state_dict().keys()
    mismatch = key_mismatch(expected, base["model"].keys())
    if mismatch:
        raise UsageError(f"base checkpoint {args.init_from} does not fit its config: {mismatch}")
    shape = {"arch": "encoder" if cfg["bidirectional"] else "gpt", "n_layer": cfg["n_layer"],
             "n_head": cfg["n_head"], "n_embd": cfg["n_embd"], "block_size": cfg["block_size"]}
    for key, value in shape.items():
        if key in explicit and getattr(args, key) != value:
            raise UsageError(f"{flag(key)} {getattr(args, key)} contradicts the base checkpoint "
                             f"{args.init_from}, which has {key} {value} (drop the flag)")
        setattr(args, key, value)
    if "pretrain_iters" not in explicit:  # unused with a base; the settings say the base's arch's
        args.pretrain_iters = ARCH_DEFAULTS[args.arch]["pretrain_iters"]


def key_mismatch(expected, found):
    """None when the keys agree, else one short line: the counts and the first offender."""
    missing, unexpected = [k for k in expected if k not in found], [k for k in found if k not in expected]
    if not missing and not unexpected:
        return None
    first = (missing or unexpected)[0]
    return (f"{len(missing)} missing and {len(unexpected)} unexpected keys, "
            f"the first {'missing' if missing else 'unexpected'} one {first!r}")


def validate_processes(args):
    """The device, and under torchrun the split of the batch over processes and micro-steps."""
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_size % (args.world * args.grad_accum):
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by {args.world} processes x "
                         f"--grad-accum {args.grad_accum}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here (try --device cpu)")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local = os.environ.get("LOCAL_WORLD_SIZE", args.world)
    if cuda and args.world > 1 and int(local) > torch.cuda.device_count():
        raise UsageError(f"{local} processes on this machine, but only "
                         f"{torch.cuda.device_count()} GPU(s): one GPU per process")
    if args.dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bf16 is not supported on this GPU (use --dtype float32)")
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    args.device = (f"cuda:{args.local_rank}" if args.world > 1 else "cuda") if cuda else "cpu"


def check_adalora(args):
    """AdaLoRA starts every matrix at --adalora-init-rank triplets and prunes to the budget by step
    --iters - --final-warmup: both must leave room for that."""
    n_matrices = args.n_layer * len(args.targets)
    args.adalora_init_rank = args.adalora_init_rank or baselines.default_adalora_rank(args.ref_rank)
    if args.final_warmup is None:
        args.final_warmup = baselines.default_final_warmup(args.iters)
    if "adalora" not in args.schedule:
        return
    if args.adalora_init_rank > args.n_embd:
        raise UsageError(f"--adalora-init-rank {args.adalora_init_rank} exceeds the smallest adapted "
                         f"dimension, --n-embd {args.n_embd}")
    if args.adalora_init_rank * n_matrices < args.budget:
        raise UsageError(f"adalora starts with {args.adalora_init_rank} x {n_matrices} = "
                         f"{args.adalora_init_rank * n_matrices} triplets, below the budget {args.budget}: "
                         f"it could only prune")
    if args.warmup + args.final_warmup >= args.iters:
        raise UsageError(f"--warmup {args.warmup} + --final-warmup {args.final_warmup} "
                         f"leave no pruning steps in --iters {args.iters}")


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


# ----------------------------------------------------------------------------- resuming

def check_resume(s):
    """{schedule: status}: with --resume, which runs are finished, interrupted or not begun (their
    settings must match); without it, all new."""
    if os.path.exists(s.run.out_dir) and not os.path.isdir(s.run.out_dir):
        raise UsageError(f"--out-dir {s.run.out_dir} is a file, not a folder")
    status = {schedule: run_status(s, schedule) if s.run.resume else "new" for schedule in s.run.schedule}
    if not s.run.resume:
        return status
    partial = glob.glob(os.path.join(s.run.out_dir, "base", "*.partial.pt"))
    if all(v == "new" for v in status.values()) and not partial:
        path = os.path.join(run_dir(s, s.run.schedule[0]), "ckpt.pt")
        raise UsageError(f"nothing to resume: checkpoint {path} does not exist, "
                         f"nor an interrupted pretraining")
    return status


def run_status(s, schedule):
    """"done" (metrics.json written after the last step), "resume" (a checkpoint) or "new"."""
    path = os.path.join(run_dir(s, schedule), "ckpt.pt")
    if not os.path.exists(path):
        return "new"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "step" not in ckpt or "settings" not in ckpt:
        raise UsageError(f"checkpoint {path} is not a training checkpoint")
    if ckpt.get("schedule") != schedule:
        raise UsageError(f"checkpoint {path} is from schedule {ckpt.get('schedule')!r}, not {schedule!r}")
    check_same_settings(ckpt["settings"], s, path, schedule)
    finished = os.path.exists(os.path.join(run_dir(s, schedule), "metrics.json"))
    return "done" if ckpt["step"] >= s.optim.iters and finished else "resume"


def check_same_settings(saved, s, path, schedule):
    """The resolved settings that shape a run's trajectory must be the checkpoint's; the message names the
    flag with the values as given."""
    keys = TRAJECTORY + (() if s.model.init_from else PRETRAIN_TRAJECTORY)
    keys += ADAPTER_TRAJECTORY if schedule != "full" else ()
    keys += GROWTH_TRAJECTORY if schedule in triadapt.SCHEDULES else ()
    keys += tuple(k for k in GROWTH_TRAJECTORY if k not in INCRELORA_FIXED) if schedule == "increlora" else ()
    keys += ADALORA_TRAJECTORY if schedule == "adalora" else ()
    try:
        before = Settings.from_public(saved)
    except (KeyError, TypeError):
        raise UsageError(f"checkpoint {path} is not a training checkpoint") from None
    now = s.public()
    for key in keys:
        if resolved(before, saved, key, schedule) != resolved(s, now, key, schedule):
            raise UsageError(f"checkpoint {path} was made with {flag(key)} {show(saved[key])}, "
                             f"not {show(now[key])}")


def resolved(s, flat, key, schedule):
    """A setting's value for `schedule` (flat: s.public()): the two whose default depends on the schedule,
    resolved."""
    if key == "lr":
        return settings.peak_lr(s, schedule)
    if key == "block_warmup":
        return settings.method(s, schedule)[2].get("block_warmup", 0)
    return flat[key]


def show(value):
    """A setting as its flag would write it (--targets q_proj,v_proj)."""
    return ",".join(value) if isinstance(value, list) else value


def make_out_dir(s):
    """The first write of a run: after every check has passed."""
    try:
        os.makedirs(s.run.out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out-dir {s.run.out_dir} cannot be created: {e.strerror}") from None
