"""
Several processes (torchrun), and what every process must agree on: this process's place, the
allocator's collectives, the check that parameters stay in sync, and the interrupt that stops every
process at the same step.

    torchrun --standalone --nproc_per_node=2 train.py

--batch-size is the global batch: every process draws the same global batch and trains on its own
1/N of it, in --grad-accum micro-steps, each weighted by its share of the batch's targets, so
gradients, growth decisions and logged losses equal one process's up to the order of float sums.
Small messages (stop flags, growth norms, digests) go over a gloo group on the CPU: no device sync.
"""
import datetime
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from report import state_fingerprint


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss, processes out of sync): one line, exit status 1."""


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


def start_processes(system):
    """Join the process group under torchrun (system: settings.SystemSettings); Procs() alone without it."""
    if system.world == 1:
        return Procs()
    cuda = system.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(system.local_rank)
    timeout = datetime.timedelta(seconds=system.dist_timeout)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    return Procs(dist.get_rank(), dist.get_world_size(), system.local_rank, ctrl)


def check_in_sync(model, procs, where):
    """Every process must hold bitwise the same parameters; a drift is a bug, so stop loudly."""
    if procs.world == 1:
        return
    digests = [None] * procs.world
    dist.all_gather_object(digests, state_fingerprint(dict(model.named_parameters())), group=procs.ctrl)
    if len(set(digests)) > 1:
        raise TrainingError(f"{where}: the processes' parameters differ (digests {sorted(set(digests))})")


def my_micro_batches(x, y, task, procs, k):
    """This process's 1/N of the global batch in k micro-batches, each with its share of the targets."""
    n = len(x) // procs.world
    mine = slice(procs.rank * n, (procs.rank + 1) * n)
    x, y, total = x[mine], y[mine], task.count(y)
    m = n // k
    return [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m], task.count(y[i * m:(i + 1) * m]) / total)
            for i in range(k)]


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


