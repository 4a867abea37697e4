"""
The settings of a run: the command line, checked and resolved once (options.resolve), kept in frozen
dataclasses, one per concern. Each part of the program receives the part it needs:

    s.model    the transformer and its base                 checkpoint.model_config, train.pretrain
    s.data     the corpora, their rows and batches          tasks.py
    s.adapter  the adapters and how they grow               method() below: inject, the allocators
    s.optim    the optimizer, its schedule, the seed        the loop (train.py)
    s.system   the device, dtype, compile, the processes    the loop, the tasks' evaluation
    s.run      what runs, and what it prints and writes     train.py, report.py

Every setting has one name, its flag's (--rank-step is s.adapter.rank_step); a derived default
(--budget, --rank-step, --adalora-init-rank, --final-warmup, --block-size, --pretrain-iters, --device,
--dtype) holds its resolved value. Two defaults depend on the schedule, so they are resolved per
schedule here: the learning rate (peak_lr) and the block warmup (method). A checkpoint keeps s.public(),
one flat {flag name: value} dict; Settings.from_public rebuilds the settings from it.
"""
import dataclasses
import os
from dataclasses import dataclass

import adapters
import triadapt


@dataclass(frozen=True)
class ModelSettings:
    arch: str                   # gpt: causal, next-byte; encoder: bidirectional, masked bytes
    n_layer: int
    n_head: int
    n_embd: int
    init_from: str | None       # a base checkpoint or a GPT-2 folder, else None: pretrain one
    pretrain_iters: int
    pretrain_lr: float


@dataclass(frozen=True)
class DataSettings:
    task: str                   # lm, or one of tasks.GLUE_TASKS
    data: str | None            # fine-tuning text file (None: Python's documentation)
    base_data: str | None       # pretraining text file (None: the standard library's sources)
    block_size: int             # the rows' length, and the model's context
    batch_size: int             # sequences per optimizer step, over all processes
    eval_iters: int


@dataclass(frozen=True)
class AdapterSettings:
    targets: tuple
    ref_rank: int               # r_ref; s = alpha / r_ref
    alpha: float
    init_rank: int              # k_0
    rank_step: int              # k
    budget: int                 # R_target
    max_rank: int | None        # None: min(d_in, d_out) per matrix
    warmup: int                 # t_w (AdaLoRA: t_i)
    interval: int               # dt
    top_k: int
    core: str
    importance: str
    block_warmup: int | None    # None: the schedule's own (method)
    advance: bool
    adalora_init_rank: int
    final_warmup: int           # AdaLoRA's t_f
    orth_reg: float             # lambda


@dataclass(frozen=True)
class OptimSettings:
    iters: int
    lr: float | None            # None: the schedule's own (peak_lr)
    lr_warmup: int
    weight_decay: float
    grad_accum: int
    seed: int


@dataclass(frozen=True)
class SystemSettings:
    device: str                 # cpu, cuda, or cuda:<local rank> under torchrun
    dtype: str                  # float32 or bf16
    compile: bool
    compile_backend: str
    compile_mode: str | None
    dist_timeout: int
    world: int                  # processes (WORLD_SIZE), this one's RANK and LOCAL_RANK
    rank: int
    local_rank: int


@dataclass(frozen=True)
class RunSettings:
    schedule: tuple             # the schedules to run, in turn
    out_dir: str
    resume: bool
    eval_interval: int
    log_interval: int
    probe_iters: int
    sample_len: int
    stop_after: int | None
    resume_command: str         # the command that continues this one


SECTIONS = {"model": ModelSettings, "data": DataSettings, "adapter": AdapterSettings, "optim": OptimSettings,
            "system": SystemSettings, "run": RunSettings}


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    data: DataSettings
    adapter: AdapterSettings
    optim: OptimSettings
    system: SystemSettings
    run: RunSettings

    def public(self):
        """{name: value} of every setting (the flags', and world, rank, local_rank, resume_command): what
        a checkpoint and metrics.json keep, tuples as lists."""
        flat = {}
        for section in dataclasses.fields(self):
            flat.update(dataclasses.asdict(getattr(self, section.name)))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}

    @classmethod
    def from_public(cls, flat):
        """The settings from a flat {name: value} dict (public(), or options.resolve's namespace)."""
        def section(kind):
            values = {f.name: flat[f.name] for f in dataclasses.fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        return cls(**{name: section(kind) for name, kind in SECTIONS.items()})

    def replace(self, **sections):
        """A copy with some settings changed, e.g. s.replace(optim={"seed": 1})."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **changes)
                                            for name, changes in sections.items()})


# ----------------------------------------------------------------------------- per schedule

INCRELORA_BLOCK_WARMUP = 10  # steps a new block of the increlora schedule takes to reach the full lr


def peak_lr(s, schedule):
    """--lr, else the schedule's own: full fine-tuning moves every weight, so it takes a smaller step."""
    return s.optim.lr or (3e-4 if schedule == "full" else 2e-3)


def method(s, schedule):
    """(adapters.Kind, the layer's options, the allocator's options) of a schedule: the one place that
    turns a schedule's name into an adapter kind; (None, {}, {}) for full fine-tuning.

    increlora is TriAdaptLoRA's allocator with IncreLoRA's choices: a diagonal core, sensitivity
    importance, the top --top-k matrices every round, a warmup (INCRELORA_BLOCK_WARMUP steps) for every
    new block and advance learning. TriAdaptLoRA itself (linear, exponential, topk) needs none of
    baselines.py's switches unless an ablation flag asks for one."""
    a = s.adapter
    if schedule == "full":
        return None, {}, {}
    common = dict(total_steps=s.optim.iters, target_total_rank=a.budget, interval=a.interval)
    if schedule == "lora":
        return adapters.KINDS["lora"], dict(rank=a.ref_rank, alpha=a.alpha), {}
    if schedule == "adalora":
        return (adapters.KINDS["adalora"], dict(rank=a.adalora_init_rank, alpha=a.alpha, ref_rank=a.ref_rank),
                dict(init_warmup=a.warmup, final_warmup=a.final_warmup, **common))
    layer = dict(rank=a.init_rank, alpha=a.alpha, ref_rank=a.ref_rank)
    common.update(warmup=a.warmup, rank_step=a.rank_step, top_k=a.top_k, max_rank=a.max_rank)
    if schedule == "increlora":
        core, importance, advance = "diagonal", "sensitivity", a.rank_step
        block_warmup = INCRELORA_BLOCK_WARMUP if a.block_warmup is None else a.block_warmup
        common["schedule"] = "topk"
    else:
        core, importance, advance = a.core, a.importance, a.rank_step if a.advance else 0
        block_warmup = a.block_warmup or 0
        common["schedule"] = schedule
    if (core, importance, advance, block_warmup) == ("triangular", "frobenius", 0, 0):
        return adapters.KINDS["triadapt"], layer, common
    return (adapters.KINDS["increlora"], dict(layer, core=core, advance=advance),
            dict(common, importance=importance, block_warmup=block_warmup))


def run_name(s, schedule):
    """The schedule, with the growth options that differ from TriAdaptLoRA's defaults: linear-diagonal,
    linear-sensitivity-bw20-advance, ... (so variants share an --out-dir without mixing)."""
    a = s.adapter
    if schedule == "increlora" and a.block_warmup not in (None, INCRELORA_BLOCK_WARMUP):
        return f"increlora-bw{a.block_warmup}"
    if schedule not in triadapt.SCHEDULES:
        return schedule
    parts = [schedule] + [v for v, default in ((a.core, "triangular"), (a.importance, "frobenius"))
                          if v != default]
    parts += [f"bw{a.block_warmup}"] if a.block_warmup else []
    parts += ["advance"] if a.advance else []
    return "-".join(parts)


def run_dir(s, schedule):
    name = run_name(s, schedule)
    return os.path.join(s.run.out_dir, name if s.data.task == "lm" else f"{s.data.task}-{name}")
