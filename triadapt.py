"""
TriAdaptLoRA: triangular adaptive low-rank adaptation (arXiv 2501.08008), in plain PyTorch.

A frozen linear layer y = x W^T + b (W is d_out x d_in) is adapted as

    y  = x W^T + b + s * ((x A^T) C^T) B^T        # forward(), as (x (C A)^T) (s B)^T: dW is never built
    dW = s * B @ C @ A                            # delta_weight(), for merge() and inspection

with A (r x d_in), B (d_out x r), core C (r x r), current rank r and a constant s = alpha / r_ref.

The core grows in blocks k_0, k_1, ..., k_m with R_j = k_0 + ... + k_j (R_-1 = 0, r = R_m).
Block j owns a row block P_j (k_j x R_j) of L at rows R_{j-1}:R_j, a column block Q_j (R_j x k_j)
of U at columns R_{j-1}:R_j, k_j rows of A and k_j columns of B; C = L + U. So one matrix trains

    r * (d_in + d_out) + 2 * sum_j k_j * R_j      parameters.

Every block starts as: A rows ~ N(0, init_std^2), B columns = 0, P_j = [0 | I_k], Q_j = 0.
Hence C = I and dW = 0 at injection, and grow(k) leaves dW exactly unchanged (C becomes
[[C, 0], [0, I]] and the new columns of B are zero).

Importance of a matrix is how fast the normalized Frobenius norm of its core moves,

    N(C) = ||C||_F / r,     score = N(C now) - N(C at the previous round),

and every `interval` steps after `warmup` the RankAllocator grows the K highest-scoring matrices
by k each, with p = (t - warmup) / (T - warmup), deficit D = R_target - R_total and

    linear: K = floor(D * p)    exponential: K = floor(D ** p)    topk: K = top_k

clamped to [1, number of matrices below their cap]; ties with the K-th score all grow.
The loss adds lambda * R_orth, R_orth = 1/(2n) sum_l (||A A^T - I||_F + ||B^T B - I||_F).

Choices where the authors' code differs or varies (see ../shared/SPEC.md and README.md):
  - s = alpha / r_ref is constant, so growth never rescales what was learned;
  - a growth is clipped so that R_total never exceeds R_target;
  - C = I, B = 0 at init, under which every factor trains (B first, then A and C a step later).

Usage: see RankAllocator's docstring; `python -m pytest tests/test_triadapt.py` checks the math.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULES = ("linear", "exponential", "topk")


class TriAdaptLinear(nn.Module):
    """A frozen nn.Linear plus the triangular adapter s * B @ (L + U) @ A."""

    def __init__(self, base: nn.Linear, rank=1, alpha=16.0, ref_rank=8, init_std=0.02):
        super().__init__()
        if rank < 1 or rank > min(base.in_features, base.out_features):
            raise ValueError(f"rank must be in [1, {min(base.in_features, base.out_features)}], got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / ref_rank
        self.ref_rank = ref_rank
        self.init_std = init_std
        self.block_sizes = []
        self.A_blocks = nn.ParameterList()  # block j: (k_j, d_in)
        self.B_blocks = nn.ParameterList()  # block j: (d_out, k_j)
        self.P = nn.ParameterList()         # block j: (k_j, R_j), rows R_{j-1}:R_j of L
        self.Q = nn.ParameterList()         # block j: (R_j, k_j), columns R_{j-1}:R_j of U
        self.merged = False
        self.grow(rank)

    @property
    def rank(self):
        return sum(self.block_sizes)

    @property
    def A(self):
        return torch.cat(list(self.A_blocks), dim=0)  # (r, d_in)

    @property
    def B(self):
        return torch.cat(list(self.B_blocks), dim=1)  # (d_out, r)

    def core(self):
        """C = L + U: row block j of L is P_j padded on the right, column block j of U is Q_j padded below."""
        r = self.rank
        L = torch.cat([F.pad(P, (0, r - P.shape[1])) for P in self.P], dim=0)        # (r, r)
        U = torch.cat([F.pad(Q, (0, 0, 0, r - Q.shape[0])) for Q in self.Q], dim=1)  # (r, r)
        return L + U

    def delta_weight(self):
        return self.scale * self.B @ self.core() @ self.A  # (d_out, d_in)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # ((x A^T) C^T) B^T s, with C and s applied to the small factors: C A costs r^2 d_in
        # once, where h C^T would cost r^2 per token, forward and backward; dW is never built.
        CA = self.core() @ self.A                  # (r, d_in)
        h = x @ CA.t()                             # (..., r)
        return y + h @ (self.scale * self.B).t()   # (..., d_out)

    def grow(self, k):
        """Border the core with one row block and one column block of size k; dW does not change."""
        if self.merged:
            raise RuntimeError("grow() on a merged layer: unmerge() first")
        d_out, d_in = self.base.weight.shape
        if k < 1 or self.rank + k > min(d_in, d_out):
            raise ValueError(f"cannot grow rank {self.rank} by {k}: the cap is min(d_in, d_out) = {min(d_in, d_out)}")
        R = self.rank + k
        w = self.base.weight
        A_new = torch.randn(k, d_in, device=w.device, dtype=w.dtype) * self.init_std
        B_new = torch.zeros(d_out, k, device=w.device, dtype=w.dtype)
        P_new = torch.zeros(k, R, device=w.device, dtype=w.dtype)
        P_new[:, R - k:] = torch.eye(k, device=w.device, dtype=w.dtype)  # [0 | I_k]
        Q_new = torch.zeros(R, k, device=w.device, dtype=w.dtype)
        new = [nn.Parameter(t) for t in (A_new, B_new, P_new, Q_new)]
        for plist, p in zip((self.A_blocks, self.B_blocks, self.P, self.Q), new):
            plist.append(p)
        self.block_sizes.append(k)
        return new

    @torch.no_grad()
    def merge(self):
        """W <- W + dW, for inference; forward() then skips the adapter."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"d_in={self.base.in_features}, d_out={self.base.out_features}, blocks={self.block_sizes}, s={self.scale:g}"


class LoRALinear(nn.Module):
    """The plain LoRA baseline in the same code path: y = x W^T + b + (alpha / r) * (x A^T) B^T."""

    def __init__(self, base: nn.Linear, rank=8, alpha=16.0, init_std=0.02):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / rank
        w = base.weight
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=w.device, dtype=w.dtype) * init_std)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.rank = rank

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ (self.scale * self.B).t()  # s on the small factor, as above


def normalized_frobenius(C):
    """N(C) = ||C||_F / r: the root-mean-square of the r * r core entries."""
    return (torch.linalg.matrix_norm(C.detach().float()) / C.shape[0]).item()


def growth_count(schedule, p, deficit, top_k=1):
    """K, the number of matrices to grow at training progress p in [0, 1], before clamping."""
    # The 1e-9 keeps float noise from flooring an exact integer down (1000 ** (1/3) = 9.999...).
    if schedule == "linear":
        return math.floor(deficit * p + 1e-9)
    if schedule == "exponential":
        return math.floor(deficit ** p + 1e-9)
    if schedule == "topk":
        return top_k
    raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def orthogonal_penalty(layers):
    """R_orth = 1/(2n) sum_l (||A_l A_l^T - I_r||_F + ||B_l^T B_l - I_r||_F) over n adapted layers."""
    layers = list(layers.values()) if isinstance(layers, dict) else list(layers)
    total = 0.0
    for layer in layers:
        A, B = layer.A, layer.B
        I = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
        total = total + torch.linalg.matrix_norm(A @ A.t() - I) + torch.linalg.matrix_norm(B.t() @ B - I)
    return total / (2 * len(layers))


def inject(model, targets, layer_cls=TriAdaptLinear, **layer_kwargs):
    """Freeze `model` and wrap, in place, every nn.Linear whose qualified name ends with a target.

    A target matches whole name components: "proj" matches "mlp.proj", not "attn.out_proj".
    Returns {qualified name: adapter layer} in the model's module order.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hit = {t: False for t in targets}
    layers = {}
    for name, linear in linears:
        matched = [t for t in targets if name == t or name.endswith("." + t)]
        if not matched:
            continue
        for t in matched:
            hit[t] = True
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layers[name] = layer_cls(linear, **layer_kwargs)
        setattr(parent, child, layers[name])
    missing = [t for t, found in hit.items() if not found]
    if missing:
        kinds = sorted({n.rpartition(".")[2] for n, _ in linears})
        raise ValueError(f"no nn.Linear named {', '.join(missing)}; linears in this model: {', '.join(kinds)}")
    return layers


class RankAllocator:
    """Grows the ranks of TriAdaptLinear layers during training, within a total-rank budget.

    Usage, with `layers = inject(model, targets)` and an optimizer over the trainable parameters:

        allocator = RankAllocator(layers, total_steps=T, warmup=100, interval=10)
        for t in range(1, T + 1):
            loss = model(x, y) + lam * orthogonal_penalty(layers); loss.backward()
            optimizer.step(); optimizer.zero_grad()
            allocator.step(t, optimizer)    # new blocks join the optimizer as new param groups
    """

    def __init__(self, layers, total_steps, target_total_rank=None, schedule="linear", warmup=0,
                 interval=1, rank_step=None, top_k=1, max_rank=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not layers:
            raise ValueError("RankAllocator needs at least one layer")
        self.layers = dict(layers)
        ref_rank = next(iter(self.layers.values())).ref_rank
        self.total_steps, self.schedule = total_steps, schedule
        self.warmup, self.interval, self.top_k = warmup, max(1, interval), top_k
        self.target_total_rank = target_total_rank or ref_rank * len(self.layers)  # R_target
        self.rank_step = rank_step or max(1, ref_rank // 2)                        # k
        cap = max_rank or float("inf")
        self.caps = {n: min(l.base.in_features, l.base.out_features, cap) for n, l in self.layers.items()}
        if self.total_rank > self.target_total_rank:
            raise ValueError(f"budget R_target = {self.target_total_rank} is below the initial total rank {self.total_rank}")
        self.prev = {n: normalized_frobenius(l.core()) for n, l in self.layers.items()}  # N_l(prev)
        self.scores = {}
        self.events = []  # (t, name, k) of every growth, in order: what resume replays

    @property
    def total_rank(self):
        return sum(l.rank for l in self.layers.values())

    def rank_pattern(self):
        return {n: l.rank for n, l in self.layers.items()}

    def step(self, t, optimizer):
        """Call right after optimizer step t (t counts from 1). Returns the names that grew."""
        if t <= self.warmup or t % self.interval or self.total_rank >= self.target_total_rank:
            return []
        now = {n: normalized_frobenius(l.core()) for n, l in self.layers.items()}
        self.scores = {n: now[n] - self.prev[n] for n in now}
        self.prev = now
        eligible = [n for n, l in self.layers.items() if l.rank < self.caps[n]]
        if not eligible:
            return []
        p = min(max((t - self.warmup) / max(1, self.total_steps - self.warmup), 0.0), 1.0)
        K = growth_count(self.schedule, p, self.target_total_rank - self.total_rank, self.top_k)
        K = min(max(K, 1), len(eligible))
        tau = sorted((self.scores[n] for n in eligible), reverse=True)[K - 1]
        chosen = sorted((n for n in eligible if self.scores[n] >= tau), key=lambda n: -self.scores[n])  # stable: ties keep layer order
        grown = []
        for name in chosen:
            layer = self.layers[name]
            k = min(self.rank_step, self.target_total_rank - self.total_rank, self.caps[name] - layer.rank)
            if k <= 0:
                break
            optimizer.add_param_group({"params": layer.grow(k)})
            self.events.append((t, name, k))
            grown.append(name)
        return grown

    def state_dict(self):
        return {"prev": dict(self.prev), "scores": dict(self.scores), "events": list(self.events)}

    def load_state_dict(self, state, optimizer):
        """Replay the recorded growths (shapes and param groups, in order), then restore the norms.

        Call on a freshly injected model before loading the model's and the optimizer's state.
        """
        if self.events:
            raise RuntimeError("load_state_dict() needs an allocator that has not grown anything yet")
        for t, name, k in state["events"]:
            optimizer.add_param_group({"params": self.layers[name].grow(k)})
        self.events = [tuple(e) for e in state["events"]]
        self.prev, self.scores = dict(state["prev"]), dict(state["scores"])
