"""
Checkpoints: what a run's checkpoint holds, how a run comes back from it bit for bit (--resume), and
which base model a run starts from.

A checkpoint holds tensors and plain data only (it loads with torch.load(weights_only=True)):

    name, settings      the run's name; settings.Settings.public(), every flag resolved (resume compares)
    model_config, model the plain model: the frozen base, the adapters at their capacity, the masks
    optimizer           AdamW's state
    allocator           the growth events, replayed first on resume (None without one)
    step, history       the last step taken, and the losses and ranks of every step so far
    rng, seconds        every generator's state (torch, numpy, python, cuda, the batches'); time so far
    schedule, before, max_held      the run's own records (report.py writes them to metrics.json)

The base: a GPT-2 folder's weights, an --init-from checkpoint, or the one pretrained for these
settings under <out-dir>/base/<hash of the settings that make it>.pt (base_path).
"""
import hashlib
import json
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch

import gpt2
from model import GPTConfig
from options import UsageError, load_checkpoint


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


def checkpoint_state(run, s, t0):
    """Everything --resume needs to continue `run` (train.Run) bit for bit; t0: when train_loop began."""
    return {"name": run.name, "settings": s.public(), "model_config": asdict(run.model.config),
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "allocator": run.allocator.state_dict() if run.allocator else None,
            "step": run.step, "rng": rng_state(run.batch_gen), "history": run.history,
            "seconds": run.seconds + time.time() - t0,
            "schedule": run.schedule, "before": run.before, "max_held": run.max_held}


def restore(run, ckpt, path):
    """Growth first (capacities and masks), then the model's and optimizer's state, then the rest."""
    if run.allocator is not None:  # it replays the growths, and puts re-created tensors in the optimizer
        run.allocator.load_state_dict(ckpt["allocator"])
    try:
        run.model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UsageError(f"checkpoint {path} does not fit this model (start the run again without "
                         f"--resume)") from None
    run.optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"], run.batch_gen)
    run.step, run.history, run.seconds = ckpt["step"], ckpt["history"], ckpt["seconds"]
    run.before, run.max_held = ckpt.get("before"), ckpt.get("max_held", run.max_held)
    run.last_good = path


# ----------------------------------------------------------------------------- the base model

def model_config(s):
    """The byte-level model of settings `s`: 256 bytes, and the encoder's mask id."""
    m = s.model
    return GPTConfig(vocab_size=257 if m.arch == "encoder" else 256, block_size=s.data.block_size,
                     n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, bidirectional=m.arch == "encoder")


GPT2_FIELDS = {"gelu_approximate": GPTConfig.gelu_approximate, "ln_eps": GPTConfig.ln_eps}


def base_key(s, digest):
    """What makes a pretrained base (its config, corpus digest, steps, lr, batch, seed), as a JSON string.
    GPT-2's options (gelu_approximate, ln_eps) at their defaults stay out of it: the bases cached before
    they existed are found again."""
    fields = {k: v for k, v in asdict(model_config(s)).items() if k not in GPT2_FIELDS or v != GPT2_FIELDS[k]}
    m = s.model
    return json.dumps({"config": fields, "data": digest, "iters": m.pretrain_iters, "lr": m.pretrain_lr,
                       "batch": s.data.batch_size, "seed": s.optim.seed}, sort_keys=True)


def base_path(s, key):
    return os.path.join(s.run.out_dir, "base", hashlib.sha256(key.encode()).hexdigest()[:12] + ".pt")


def given_base(init_from):
    """The base checkpoint of --init-from (a GPT-2 folder's weights, read from safetensors, or a file of
    this project), with its path as "path"."""
    if gpt2.is_folder(init_from):
        try:
            model = gpt2.from_pretrained(init_from)
        except gpt2.GPT2Error as e:
            raise UsageError(str(e)) from None
        return {"model": model.state_dict(), "config": asdict(model.config), "path": init_from}
    return {**load_checkpoint(init_from, "base checkpoint"), "path": init_from}
