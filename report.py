"""
What a finished fine-tuning run leaves behind, and the text it prints.

    <out-dir>/<run>/adapter.pt     the trained factors (or the whole model, for full fine-tuning), the
                                   settings that rebuild them and the fingerprint of their base
    <out-dir>/<run>/metrics.json   losses, the task's metric before and after, parameters, ranks, history
    <out-dir>/<run>/report.svg     the run's picture, drawn from metrics.json alone (plot.py)

Every file is written atomically (a kill leaves the old file or the new one, never half of one), and
metrics.json after adapter.pt: its presence marks a run as done, which is what lets bench.py skip it.
train.py calls report() at the end of every fine-tune; sample.py checks an adapter against its base
with state_fingerprint() and ADAPTER_FORMAT.
"""
import hashlib
import json
import os
from dataclasses import asdict

import torch

import adapters
import plot
import tasks
import tensorfile
import triadapt
from options import TARGETS


def atomic_save(obj, path, writer=None):
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves old or new."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tensorfile.atomic_write(path, lambda fh: (writer or adapters.save_file)(obj, fh))


def save_json(obj, path, indent=1):
    atomic_save(obj, path, lambda o, fh: fh.write(json.dumps(o, indent=indent).encode()))


def save_text(text, path):
    atomic_save(text, path, lambda o, fh: fh.write(o.encode()))


def report(s, run, folder, base_ckpt):
    """Evaluate the finished run on val and test, write its three files, print its summary; returns
    the metrics."""
    model, layers, task, before = run.model, run.layers, run.task, run.before
    val, test = task.evaluate(model, "val"), task.evaluate(model, "test")
    metrics = {"schedule": run.schedule, "run": run.name, "val_loss_before": before["loss"],
               "val_loss": val["loss"], "test_loss": test["loss"],
               "trainable_params": triadapt.count_trainable(model),
               "max_trainable_params": run.max_held,
               "peak_lr": run.peak_lr,
               "rank_pattern": {n: l.rank for n, l in layers.items()},
               "total_rank": sum(l.rank for l in layers.values()),
               "block_sizes": {n: list(l.block_sizes) for n, l in layers.items()
                               if hasattr(l, "block_sizes")},
               "growth_events": run.allocator.events if run.allocator else [], "seconds": run.seconds,
               "world_size": s.system.world, "config": s.public(), "history": run.history}
    for key in [k for k in val if k != "loss"]:  # acc, and the task's own metric (mcc, f1)
        metrics.update({f"val_{key}_before": before[key], f"val_{key}": val[key], f"test_{key}": test[key]})
        if f"test_{key}" in before:
            metrics[f"test_{key}_before"] = before[f"test_{key}"]
    if hasattr(task, "metric"):
        metrics["metric"] = task.metric
    adapter_path = save_adapter(s, run, folder, base_ckpt)  # before metrics.json, which marks the run done
    save_json(metrics, os.path.join(folder, "metrics.json"))
    # the picture is drawn from metrics.json alone
    save_text(plot.run_report(metrics, folder), os.path.join(folder, "report.svg"))
    print(f"\n[{run.name}] val loss {before['loss']:.4f} -> {val['loss']:.4f} (test {test['loss']:.4f})"
          + "".join(f", val {k} {before[k]:.3f} -> {val[k]:.3f} (test {test[k]:.3f})"
                    for k in val if k != "loss")
          + f"; {metrics['trainable_params']:,} trainable parameters; {run.seconds:.1f} s")
    if layers:
        print(f"final ranks (total {metrics['total_rank']}):\n{rank_table(layers)}")
    print(adapter_line(adapter_path, base_ckpt.get("path"), run.name))
    print(f"picture: {os.path.join(folder, 'report.svg')}")
    device = s.system.device
    if s.data.task == "lm" and s.model.arch == "gpt" and s.run.sample_len:
        gen = torch.Generator(device=device).manual_seed(s.optim.seed)
        tok = tasks.tokenizer(s.model.init_from)  # GPT-2's BPE for a GPT-2 base, else bytes
        prompt = torch.tensor([tasks.encode("The ", tok)], device=device)
        model.eval()
        with tasks.amp(device, s.system.dtype):
            out = model.generate(prompt, s.run.sample_len, temperature=0.8, top_k=50, generator=gen)
        print("sample:\n" + tasks.decode(out[0].tolist(), tok))
    return metrics


def state_fingerprint(state):
    """sha256 over a state_dict's names, dtypes, shapes and values in sorted key order: what identifies
    a base model. Unlike a hash of the file's bytes, a re-saved copy of the same weights matches."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(s, run, folder, base_ckpt):
    """<folder>/adapter.pt, written atomically: what the run trained (the adapter factors with their block
    sizes, and a classifier's new head), the settings that rebuild it, and the path and fingerprint of
    the base it belongs to; sample.py loads it. Full fine-tuning trains every weight, so its "adapter"
    is the whole state_dict."""
    model, full = run.model, run.schedule == "full"
    head = model.cls_head.state_dict() if model.cls_head is not None and not full else None
    adapter = {"format": adapters.FORMAT, "schedule": run.schedule, "run": run.name,
               "arch": s.model.arch, "task": s.data.task, "targets": list(s.adapter.targets),
               "n_classes": model.config.n_classes, "model_config": asdict(model.config),
               "layers": adapters.adapter_state(run.layers),  # {name: kind, settings and values}
               "cls_head": {k: v.detach().cpu() for k, v in head.items()} if head else None,
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()} if full else None,
               "base_path": base_ckpt.get("path"), "base_fingerprint": state_fingerprint(base_ckpt["model"])}
    path = os.path.join(folder, "adapter.pt")
    atomic_save(adapter, path)
    return path


def write_peft_lora(folder, config, tensors):
    """<folder>/adapter_model.safetensors and adapter_config.json (adapters.peft_config, peft_tensors),
    each written atomically; the config last, so a folder with a config is complete."""
    atomic_save(tensors, os.path.join(folder, "adapter_model.safetensors"),
                lambda obj, fh: tensorfile.write(fh, obj, {"format": "pt"}))
    save_json(config, os.path.join(folder, "adapter_config.json"), indent=2)


def human_size(n):
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def adapter_line(path, base_path, schedule):
    """One line for the report: the adapter's size next to its base's, and how to use it."""
    if base_path and os.path.isdir(base_path):  # a GPT-2 folder: its weights' file
        base_path = os.path.join(base_path, "model.safetensors")
    base = human_size(os.path.getsize(base_path)) if base_path and os.path.exists(base_path) else "unknown"
    what = ", the whole fine-tuned model" if schedule == "full" else ""
    return (f"adapter: {path} {human_size(os.path.getsize(path))}{what} (base {base}); "
            f"use it with: python sample.py --run {os.path.dirname(path)}")


def rank_table(layers):
    """Final ranks as text: layers as rows, module kinds as columns."""
    kinds = [k for k in TARGETS if any(n.endswith("." + k) for n in layers)]
    rows = sorted({int(n.split(".")[1]) for n in layers})
    lines = ["layer " + " ".join(f"{k:>8}" for k in kinds)]
    for i in rows:
        cells = [layers.get(f"blocks.{i}.{'attn' if k in TARGETS[:4] else 'mlp'}.{k}") for k in kinds]
        lines.append(f"{i:>5} " + " ".join(f"{c.rank if c is not None else '-':>8}" for c in cells))
    return "\n".join(lines)


def comparison_table(results):
    """One row per run: losses, the task's metric (acc, and mcc or f1) before and after, parameters."""
    metric = results[0].get("metric")
    keys = (["acc"] + ([metric] if metric and metric != "acc" else [])
            + (["f1"] if "val_f1" in results[0] else []))
    width = max(12, *(len(m.get("run", m["schedule"])) for m in results))
    head = (f"{'schedule':<{width}} {'val before':>10} {'val after':>10} {'test':>8}"
            + "".join(f" {'val ' + k:>8} {'test ' + k:>8}" for k in keys if f"val_{k}" in results[0])
            + f" {'trainable':>10} {'rank':>6} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for m in results:
        cells = "".join(f" {m[f'val_{k}']:>8.3f} {m[f'test_{k}']:>8.3f}" for k in keys if f"val_{k}" in m)
        rank = m["total_rank"] if m["rank_pattern"] else "-"
        lines.append(f"{m.get('run', m['schedule']):<{width}} {m['val_loss_before']:>10.4f} "
                     f"{m['val_loss']:>10.4f} {m['test_loss']:>8.4f}{cells} "
                     f"{m['trainable_params']:>10,} {rank:>6} {m['seconds']:>8.1f}")
    return "\n".join(lines)
