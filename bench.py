"""
Measure TriAdaptLoRA side by side with its baselines, in one run, on this machine.

    python bench.py speed                 # step time of each method as a ratio to plain LoRA (~minutes on 2 cores)
    python bench.py speed --device cuda
    python bench.py quality               # 6 methods x 3 seeds on the default task (76 minutes measured on 2 shared cores)
    python bench.py quality --quick       # a smoke run of the same
    python bench.py quality --task classify --methods linear,lora,full   # encoder accuracy

speed: on the default model shape and a wider one, the median time of one full training step
(forward, backward, AdamW) for plain LoRA at rank r, TriAdaptLoRA at rank r (one block, and
grown in blocks 1 + k + ...), a variant that materializes dW = s B C A on every call (as the
authors' code does), and full fine-tuning; all on the same batches, interleaved step by step so
that machine noise hits every method alike. Then the time the allocator's rounds take as a
fraction of a fine-tuning run.

quality: one shared base model; linear, exponential and topk growth, plain LoRA at r_ref, plain
LoRA at the rank whose parameter count is closest to the linear run's final count, and full
fine-tuning, each for several seeds with the same steps and learning-rate schedule (train.py's
finetune()). Reports the test split (never used to choose anything), mean +- std over seeds, and
the fraction of the base-to-full gap each method closes.
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import data
import train
import triadapt
from model import GPT, GPTConfig


class MaterializedTriAdaptLinear(triadapt.TriAdaptLinear):
    """The same adapter, computed by building dW = s B C A (d_out x d_in) on every forward."""

    def forward(self, x):
        return self.base(x) + F.linear(x, self.delta_weight())


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ----------------------------------------------------------------------------- speed

def make_variant(name, config, rank, rank_step, device):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    targets = list(train.TARGETS)
    if name == "lora":
        triadapt.inject(model, targets, layer_cls=triadapt.LoRALinear, rank=rank)
    elif name == "full":
        pass
    else:
        cls = MaterializedTriAdaptLinear if name == "materialized" else triadapt.TriAdaptLinear
        first = rank if name == "tri (1 block)" else 1
        layers = triadapt.inject(model, targets, layer_cls=cls, rank=first, ref_rank=rank)
        for layer in layers.values():
            while layer.rank < rank:
                layer.grow(min(rank_step, rank - layer.rank))
    params = [p for p in model.parameters() if p.requires_grad]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, triadapt.TriAdaptLinear)}
    return model, layers, torch.optim.AdamW(params, lr=1e-4)


def time_steps(config, rank, rank_step, device, batch_size, steps, variants):
    """Median seconds per training step of each variant, interleaved on the same batches."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (batch_size, config.block_size + 1), generator=g).to(device) for _ in range(4)]
    built = {v: make_variant(v, config, rank, rank_step, device) for v in variants}
    times = {v: [] for v in variants}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(steps + 3):  # the first 3 rounds warm up allocators and caches
        xy = batches[i % len(batches)]
        for v, (model, layers, opt) in built.items():
            sync()
            t0 = time.perf_counter()
            loss = model(xy[:, :-1], xy[:, 1:])[1]
            if layers:
                loss = loss + 0.1 * triadapt.orthogonal_penalty(layers)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= 3:
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(ts) for v, ts in times.items()}


def allocator_fraction(config, args, steps=120):
    """Seconds spent in RankAllocator.step over seconds of the whole loop, in a short real fine-tune."""
    torch.manual_seed(0)
    model = GPT(config).to(args.device)
    layers = triadapt.inject(model, list(train.TARGETS), rank=1, ref_rank=args.rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    alloc = triadapt.RankAllocator(layers, total_steps=steps, warmup=10, interval=10)
    g = torch.Generator().manual_seed(0)
    in_alloc, rounds = 0.0, 0
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    t_start = time.perf_counter()
    for t in range(1, steps + 1):
        xy = torch.randint(0, 256, (args.batch_size, config.block_size + 1), generator=g).to(args.device)
        loss = model(xy[:, :-1], xy[:, 1:])[1] + 0.1 * triadapt.orthogonal_penalty(layers)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        alloc.step(t, opt)
        sync()
        in_alloc += time.perf_counter() - t0
        rounds += t > alloc.warmup and t % alloc.interval == 0
    total = time.perf_counter() - t_start
    return in_alloc / total, rounds, alloc.total_rank


def speed(args):
    variants = ["lora", "tri (1 block)", "tri (grown)", "materialized", "full"]
    shapes = [("default", GPTConfig()), ("wide", GPTConfig(n_embd=384, n_head=6))]
    rank_step = max(1, args.rank // 2)
    print(f"machine: {machine()}, device {args.device}")
    print(f"median seconds of one training step (batch {args.batch_size} x {GPTConfig().block_size}, rank {args.rank}, "
          f"grown in blocks {[1] + [rank_step] * ((args.rank - 1) // rank_step) + ([(args.rank - 1) % rank_step] if (args.rank - 1) % rank_step else [])}), "
          f"{args.steps} interleaved steps each")
    results = {}
    header = f"{'shape':<8} {'n_embd':>6} " + " ".join(f"{v:>14}" for v in variants)
    print(header)
    for label, config in shapes:
        med = time_steps(config, args.rank, rank_step, args.device, args.batch_size, args.steps, variants)
        results[label] = med
        print(f"{label:<8} {config.n_embd:>6} " + " ".join(f"{med[v] * 1e3:>11.1f} ms" for v in variants))
    print("\nratios")
    print(f"{'shape':<8} {'tri(1)/lora':>12} {'tri(grown)/lora':>16} {'materialized/tri':>17} {'full/lora':>10}")
    for label, med in results.items():
        print(f"{label:<8} {med['tri (1 block)'] / med['lora']:>12.3f} {med['tri (grown)'] / med['lora']:>16.3f} "
              f"{med['materialized'] / med['tri (grown)']:>17.3f} {med['full'] / med['lora']:>10.3f}")
    frac, rounds, total_rank = allocator_fraction(GPTConfig(), args)
    print(f"\nallocator: {rounds} rounds in a 120-step fine-tune (default shape) took {100 * frac:.2f}% of its time "
          f"(total rank grew to {total_rank})")
    return results


# ----------------------------------------------------------------------------- quality

def quality(args):
    """Fine-tune every method for every seed from one shared base; returns the raw metrics."""
    common = ["--device", args.device, "--iters", str(args.iters), "--sample-len", "0", "--eval-interval", str(args.iters)]
    if args.task == "classify":
        common += ["--arch", "encoder", "--task", "classify"]
    if args.quick:
        common += ["--pretrain-iters", "100", "--warmup", "10", "--eval-iters", "5", "--iters", "60", "--eval-interval", "60", "--probe-iters", "20"]
    common += args.train_args

    def parsed(*extra, out_dir=args.out_dir):
        targs = train.build_parser().parse_args(common + ["--out-dir", out_dir] + list(extra))
        train.validate(targs)
        return targs

    base_args = parsed()
    base_splits, ft_splits, digest = train.prepare_data(base_args)
    base = train.pretrain(base_args, base_splits, digest)
    classify = args.task == "classify"
    results = {"task": args.task, "machine": machine(), "methods": {},
               "base": None if classify else base_losses(base, ft_splits, base_args)}

    def run(label, schedule, *extra):
        runs = []
        for seed in range(args.seeds):
            targs = parsed("--schedule", schedule, "--seed", str(args.first_seed + seed), *extra,
                           out_dir=os.path.join(args.out_dir, "bench", f"{label.replace(' ', '_')}-seed{seed}"))
            if classify:
                task = train.ClassifyTask(ft_splits, targs)
                runs.append(train.finetune(targs, schedule, base, task, n_classes=len(data.CLASS_PACKAGES)))
            else:
                runs.append(train.finetune(targs, schedule, base, train.LMTask(ft_splits, targs)))
        results["methods"][label] = runs

    for schedule in ("linear", "exponential", "topk"):
        if schedule in args.methods:
            run(schedule, schedule)
    if "lora" in args.methods:
        run("lora r_ref", "lora")
    if "lora" in args.methods and "linear" in args.methods:
        # plain LoRA with as many trainable parameters as the linear runs ended with, at the same s
        per_rank = results["methods"]["lora r_ref"][0]["trainable_params"] / base_args.ref_rank
        matched = max(1, round(statistics.mean(m["trainable_params"] for m in results["methods"]["linear"]) / per_rank))
        if matched != base_args.ref_rank:
            run(f"lora r={matched}", "lora", "--ref-rank", str(matched), "--alpha", str(base_args.alpha * matched / base_args.ref_rank))
    if "full" in args.methods:
        run("full", "full")
    return results


def base_losses(base_ckpt, ft_splits, args):
    model = GPT(GPTConfig(**base_ckpt["config"])).to(args.device_name)
    model.load_state_dict(base_ckpt["model"])
    task = train.LMTask(ft_splits, args)
    return {"val_loss": task.evaluate(model, "val")["loss"], "test_loss": task.evaluate(model, "test")["loss"]}


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def quality_table(results):
    base_test = results["base"]["test_loss"]
    full = results["methods"].get("full")
    full_test = statistics.mean(m["test_loss"] for m in full) if full else None
    lines = [f"{'method':<14} {'val loss':>16} {'test loss':>16} {'gap closed':>10} {'trainable':>10} {'final rank':>10} {'seconds':>8}",
             f"{'base (no FT)':<14} {results['base']['val_loss']:>16.4f} {base_test:>16.4f} {0.0:>10.3f} {0:>10,} {'-':>10} {'-':>8}"]
    for label, runs in results["methods"].items():
        v, vs = mean_std([m["val_loss"] for m in runs])
        t, ts = mean_std([m["test_loss"] for m in runs])
        closed = f"{(base_test - t) / (base_test - full_test):.3f}" if full else "-"
        rank = statistics.mean(m["total_rank"] for m in runs) if runs[0]["rank_pattern"] else "-"
        params = round(statistics.mean(m["trainable_params"] for m in runs))
        secs = statistics.mean(m["seconds"] for m in runs)
        lines.append(f"{label:<14} {v:>8.4f} +- {vs:.4f} {t:>8.4f} +- {ts:.4f} {closed:>10} {params:>10,} "
                     f"{rank if rank == '-' else f'{rank:.0f}':>10} {secs:>8.1f}")
    return "\n".join(lines)


def accuracy_table(results):
    """Classification: accuracy before (head only, on the frozen encoder) and after, mean +- std."""
    lines = [f"{'method':<14} {'val acc before':>14} {'val acc':>16} {'test acc':>16} {'trainable':>10} {'final rank':>10} {'seconds':>8}"]
    for label, runs in results["methods"].items():
        b = statistics.mean(m["val_acc_before"] for m in runs)
        v, vs = mean_std([m["val_acc"] for m in runs])
        t, ts = mean_std([m["test_acc"] for m in runs])
        rank = f"{statistics.mean(m['total_rank'] for m in runs):.0f}" if runs[0]["rank_pattern"] else "-"
        params = round(statistics.mean(m["trainable_params"] for m in runs))
        secs = statistics.mean(m["seconds"] for m in runs)
        lines.append(f"{label:<14} {b:>14.3f} {v:>8.3f} +- {vs:.3f} {t:>8.3f} +- {ts:.3f} {params:>10,} {rank:>10} {secs:>8.1f}")
    return "\n".join(lines)


def heat_map(metrics):
    """Rank of every matrix after every allocation round: matrices as rows, rounds as columns.
    One character a cell: the rank in base 36 (0-9, then a-z)."""
    events = metrics["growth_events"]
    rounds = sorted({t for t, _, _ in events})
    ranks = {n: b[0] for n, b in metrics["block_sizes"].items()}
    grid = {n: [] for n in ranks}
    for t in rounds:
        for _, name, k in (e for e in events if e[0] == t):
            ranks[name] += k
        for n in grid:
            grid[n].append(ranks[n])
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    short = {n: n.replace("blocks.", "").replace(".attn.", ".").replace(".mlp.", ".") for n in grid}
    width = max(len(s) for s in short.values())
    lines = [f"{'':<{width}} " + (f"{len(rounds)} rounds, one column each, steps {rounds[0]}..{rounds[-1]}" if rounds else "(no rounds)")]
    for n, row in grid.items():
        lines.append(f"{short[n]:<{width}} " + "".join(digits[r] if r < 36 else "+" for r in row))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="Measure TriAdaptLoRA against plain LoRA, a dW-materializing variant and full fine-tuning.")
    p.add_argument("what", choices=("speed", "quality"), help="speed: step times and ratios; quality: losses over seeds")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    p.add_argument("--rank", type=int, default=8, help="speed: the adapters' rank r (TriAdaptLoRA grown to it)")
    p.add_argument("--batch-size", type=int, default=32, help="speed: sequences per step")
    p.add_argument("--steps", type=int, default=30, help="speed: timed steps per method and shape")
    p.add_argument("--iters", type=int, default=600, help="quality: fine-tuning steps per run")
    p.add_argument("--seeds", type=int, default=3, help="quality: seeds per method")
    p.add_argument("--first-seed", type=int, default=0, help="quality: the first fine-tuning seed")
    p.add_argument("--quick", action="store_true", help="quality: a tiny smoke run (60 steps, 100 pretraining steps)")
    p.add_argument("--out-dir", default="out", help="quality: where the base model, the runs and bench_quality_<task>.json go")
    p.add_argument("--methods", default="linear,exponential,topk,lora,full", help="quality: which methods to run (lora also runs the parameter-matched rank when linear runs)")
    p.add_argument("--task", default="lm", choices=("lm", "classify"), help="quality: lm (GPT on the documentation, losses) or classify (encoder, package labels, accuracy)")
    p.add_argument("--train-args", default="", help="quality: extra train.py flags for every run, e.g. '--warmup 100 --interval 20'")
    args = p.parse_args()
    args.train_args = args.train_args.split()
    args.methods = args.methods.split(",")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda, but CUDA is not available here\n")
    if args.what == "speed":
        speed(args)
        return
    t0 = time.time()
    results = quality(args)
    print(f"\nquality on the {args.task} task, {args.seeds} seeds, {args.iters if not args.quick else 60} steps each; test split; "
          f"machine: {results['machine']}; {time.time() - t0:.0f} s in all")
    print(accuracy_table(results) if args.task == "classify" else quality_table(results))
    print("\nlinear schedule, first seed: rank of every matrix after each allocation round")
    if "linear" in results["methods"]:
        print(heat_map(results["methods"]["linear"][0]))
    path = os.path.join(args.out_dir, f"bench_quality_{args.task}.json")
    train.save_json(results, path)
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
