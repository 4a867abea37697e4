"""
TriAdaptLoRA: triangular adaptive low-rank adaptation (arXiv 2501.08008), in plain PyTorch.

A frozen linear layer y = x W^T + b (W is d_out x d_in) is adapted as

    y  = x W^T + b + (x (s C A)^T) B^T          # forward(): dW is never built
    dW = s * B @ C @ A                          # delta_weight(), for merge() and inspection

with A (r x d_in), B (d_out x r), core C = L + U (r x r), rank r and a constant s = alpha / r_ref. The core
grows in blocks k_0, k_1, ..., R_j = k_0 + ... + k_j (R_-1 = 0, r = R_m): block j owns a row block P_j
(k_j x R_j) of L at rows R_{j-1}:R_j, a column block Q_j (R_j x k_j) of U at columns R_{j-1}:R_j, k_j rows
of A and k_j columns of B, so a matrix trains r (d_in + d_out) + 2 sum_j k_j R_j numbers. A block starts
as A rows ~ N(0, init_std^2), B columns 0, P_j = [0 | I], Q_j = 0: C = I and dW = 0 at injection, and
grow(k) leaves dW exactly unchanged. Every `interval` steps after `warmup` RankAllocator scores each
matrix by how fast N(C) = ||C||_F / r moved since the previous round, and grows the K best by k, with
p = (t - warmup) / (T - warmup) and deficit D = R_target - R_total:

    linear: K = floor(D * p)    exponential: K = floor(D ** p)    topk: K = top_k

clamped to [1, matrices below their cap]; ties with the K-th score all grow, and R_total never passes
R_target. The loss adds lambda * R_orth, R_orth = 1/(2n) sum_l (||A A^T - I_r||_F + ||B^T B - I_r||_F).

Storage at a fixed capacity c >= r (2 r_ref, doubled when a growth would pass it): A (c, d_in), B (d_out, c),
L, U (c, c), s C = L * L_mask + U * U_mask; a growth writes in place and opens the masks. A doubling's new
tensors go into the optimizer, and allocator.recreated names their layers (re-wrap DDP or compile then).

    layers = inject(model, ["q_proj", "v_proj"], rank=1, ref_rank=8)          # {name: TriAdaptLinear}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    allocator = RankAllocator(layers, total_steps=T, warmup=100, interval=10, optimizer=opt)
    for t in range(1, T + 1):
        loss = loss_fn(model(x), y) + 0.1 * orthogonal_penalty(layers)
        loss.backward(); opt.step()
        allocator.update_and_allocate(t)  # may grow ranks, in place; keeps `opt` right through a doubling
        opt.zero_grad()

A base is an nn.Linear or a Conv1D in any dtype (bases.py); tests/test_oracle.py is a literal slow version.
"""
import itertools
import math

import torch
import torch.nn as nn

import bases
from bases import count_trainable  # noqa: F401 (part of this module's API: adapters by n_trainable)

SCHEDULES = ("linear", "exponential", "topk")


class TriAdaptLinear(nn.Module):
    """A frozen nn.Linear (or Conv1D) plus the triangular adapter s * B @ (L + U) @ A, at a fixed capacity."""
    KIND = "triadapt"  # the "kind" of its adapter entries (adapters.py: the registry of kinds)

    def __init__(self, base, rank=1, alpha=16.0, ref_rank=8, init_std=0.02, fan_in_fan_out=None):
        super().__init__()
        self.d_out, self.d_in, self.fan_in_fan_out = bases.base_shape(base, fan_in_fan_out)
        self.max_rank = min(self.d_in, self.d_out)
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}")
        self.base = base.requires_grad_(False)
        self.alpha, self.scale, self.ref_rank, self.init_std = alpha, alpha / ref_rank, ref_rank, init_std
        self.block_sizes, self.merged = [], False
        self._allocate(min(self.max_rank, max(rank, 2 * ref_rank)))
        self.first_block(rank)

    first_block = lambda self, rank: self.grow(rank)  # the initial block (a subclass may set itself up first)

    def _allocate(self, c):
        """Zero factors and masks at capacity c: what a layer of rank 0 holds."""
        kw = dict(device=self.base.weight.device, dtype=bases.adapter_dtype(self.base.weight))
        self.A = nn.Parameter(torch.zeros(c, self.d_in, **kw))   # (c, d_in), rows past r are 0
        self.B = nn.Parameter(torch.zeros(self.d_out, c, **kw))  # (d_out, c), columns past r are 0
        self.L = nn.Parameter(torch.zeros(c, c, **kw))           # (c, c), row block j is P_j, 0 elsewhere
        self.U = nn.Parameter(torch.zeros(c, c, **kw))           # (c, c), column block j is Q_j, 0 elsewhere
        self.register_buffer("L_mask", torch.zeros(c, c, **kw))  # (c, c), s on the row blocks
        self.register_buffer("U_mask", torch.zeros(c, c, **kw))  # (c, c), s on the column blocks
        self.register_buffer("gram_mask", torch.zeros(c, c, **kw), persistent=False)  # (c, c), 1 on r x r

    capacity = property(lambda self: self.A.shape[0])  # c
    rank = property(lambda self: sum(self.block_sizes))  # r

    @property
    def n_trainable(self):
        """r (d_in + d_out) + 2 sum_j k_j R_j: the numbers that train (never the masked zeros)."""
        return self.rank * (self.d_in + self.d_out) + 2 * sum((hi - lo) * hi for lo, hi in self.blocks())

    def blocks(self):
        """[(R_{j-1}, R_j) for every block j]."""
        R = [0] + list(itertools.accumulate(self.block_sizes))
        return list(zip(R[:-1], R[1:]))

    P = property(lambda self: [self.L[lo:hi, :hi] for lo, hi in self.blocks()])  # P_j (k_j, R_j), views of L
    Q = property(lambda self: [self.U[:hi, lo:hi] for lo, hi in self.blocks()])  # Q_j (R_j, k_j), views of U

    def scaled_core(self):
        """s C at capacity (c, c): zero outside the blocks, and the masks give those entries no gradient."""
        return self.L * self.L_mask + self.U * self.U_mask

    def core(self):
        """C = L + U on the active blocks, (r, r): for inspection and the allocator (not the hot path)."""
        C = torch.where(self.L_mask != 0, self.L, 0) + torch.where(self.U_mask != 0, self.U, 0)  # (c, c)
        return C[:self.rank, :self.rank]

    def delta_weight(self):
        return self.B @ (self.scaled_core() @ self.A)  # (d_out, d_in)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # s C A costs c^2 d_in once a call, where h C^T would cost c^2 per token, forward and backward
        CA = self.scaled_core() @ self.A   # (c, d_in), rows past r are 0
        return y + bases.adapter_out(x, CA, self.B, y.dtype)  # (..., d_out)

    @torch.no_grad()
    def grow(self, k):
        """Add a block of size k in place: fresh_rows(), P = [0 | I], Q = 0, then open_block(); dW does not
        change. Past the capacity reserve() re-creates the tensors (subclasses override these three hooks)."""
        if self.merged:
            raise RuntimeError("grow() on a merged layer: unmerge() first")
        r = self.rank
        if k < 1 or r + k > self.max_rank:
            raise ValueError(f"cannot grow rank {r} by {k}: the cap is min(d_in, d_out) = {self.max_rank}")
        self.reserve(r + k)
        self.fresh_rows(r, r + k)
        self.L[r:r + k, :r + k] = 0
        self.L[r:r + k, r:r + k] = torch.eye(k, device=self.L.device, dtype=self.L.dtype)
        self.U[:r + k, r:r + k] = 0
        self.block_sizes.append(k)
        self.open_block(r, r + k)

    def fresh_rows(self, lo, hi):
        """A new block's factors: A's rows lo:hi ~ N(0, init_std^2), B's columns lo:hi 0."""
        self.A[lo:hi], self.B[:, lo:hi] = torch.randn_like(self.A[lo:hi]) * self.init_std, 0

    def open_block(self, lo, hi):
        """Mark block lo:hi live: its row block of L, its column block of U, and R_orth's r x r corner."""
        self.L_mask[lo:hi, :hi] = self.scale
        self.U_mask[:hi, lo:hi] = self.scale
        self.gram_mask[:hi, :hi] = 1

    @torch.no_grad()
    def reserve(self, n):
        """Make the capacity at least n, doubling it (up to max_rank): new tensors, old values in the corner."""
        c = self.capacity
        if n <= c or c >= self.max_rank:  # at max_rank a growth clips itself: nothing to re-create
            return
        old = {name: t.clone() for name, t in itertools.chain(self.named_parameters(recurse=False),
                                                               self.named_buffers(recurse=False))}
        self._allocate(min(self.max_rank, max(2 * c, n)))
        for name, t in itertools.chain(self.named_parameters(recurse=False), self.named_buffers(recurse=False)):
            t[tuple(slice(0, size) for size in old[name].shape)] = old[name]

    merge = lambda self: bases.merge_into_base(self, 1)     # W <- W + dW: forward() then skips the adapter
    unmerge = lambda self: bases.merge_into_base(self, -1)  # W <- W - dW

    def lora_factors(self):
        """(lora_A (r, d_in), lora_B (d_out, r)) with lora_B @ lora_A = dW: s C A and B on the active rank."""
        return (self.scaled_core()[:self.rank] @ self.A).detach(), self.B[:, :self.rank].detach()

    def adapter_entry(self):
        """The kind, the settings and the active entries only (no capacity padding): adapters.py saves it,
        from_entry() rebuilds the layer from it."""
        r = self.rank
        return {"kind": self.KIND, "alpha": self.alpha, "ref_rank": self.ref_rank, "block_sizes": self.block_sizes[:],
                "fan_in_fan_out": self.fan_in_fan_out, "A": self.A[:r], "B": self.B[:, :r], "L": self.L[:r, :r],
                "U": self.U[:r, :r]}

    @classmethod
    @torch.no_grad()
    def from_entry(cls, base, entry, **kwargs):
        """The layer adapter_entry() describes, on `base`: made at its first block, grown by the others,
        then its tensors copied in (views of the active entries: a shape that differs is refused)."""
        first, *rest = entry["block_sizes"]
        layer = cls(base, rank=first, alpha=entry["alpha"], ref_rank=entry["ref_rank"],
                    fan_in_fan_out=entry["fan_in_fan_out"], **kwargs)
        for k in rest:
            layer.grow(k)
        bases.copy_into({k: v for k, v in layer.adapter_entry().items() if torch.is_tensor(v)}, entry)
        return layer

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.d_out}, blocks={self.block_sizes}, c={self.capacity}, s={self.scale:g}"


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


class MaskedGramNorms(torch.autograd.Function):
    """sum_i ||(G_i - I) * M_i||_F, G_i = X_i X_i^T (rows: X_i is A, c x d) or X_i^T X_i (X_i is B, d x c).
    Its gradient, 2 D_i X_i / ||D_i||_F (or 2 X_i D_i / ||D_i||_F) with D_i the masked, symmetric difference,
    is written out: one batched product and one unbind, where autograd's chain takes a slice a factor."""

    @staticmethod
    def forward(ctx, rows, masks, *Xs):
        X = torch.stack(Xs)                                                        # (n, c, d) or (n, d, c)
        eye = torch.eye(masks.shape[-1], device=X.device, dtype=X.dtype)
        D = ((X @ X.mT if rows else X.mT @ X) - eye) * masks                       # (n, c, c)
        norms = torch.linalg.matrix_norm(D)                                        # (n,)
        ctx.rows = rows
        ctx.save_for_backward(X, D, norms)
        return norms.sum()

    @staticmethod
    def backward(ctx, g):
        X, D, norms = ctx.saved_tensors
        D = D * (2 * g / norms.clamp_min(1e-30))[:, None, None]                    # (n, c, c)
        return (None, None, *(D @ X if ctx.rows else X @ D).unbind(0))


def orthogonal_penalty(layers):
    """R_orth = 1/(2n) sum_l (||A_l A_l^T - I_r||_F + ||B_l^T B_l - I_r||_F) over n adapted layers: the Grams
    at capacity, G - I masked to the r x r corner (gram_mask), factors of one shape in one batched product."""
    layers = list(layers.values()) if isinstance(layers, dict) else list(layers)
    groups = {}
    for layer in layers:  # one stack per shape, device and dtype: torch.stack takes nothing else
        for side in "AB":
            X = getattr(layer, side)
            groups.setdefault((side, X.shape, X.device, X.dtype), []).append(layer)
    parts = [MaskedGramNorms.apply(side == "A", torch.stack([layer.gram_mask for layer in group]),  # (n, c, c)
                                   *[getattr(layer, side) for layer in group])
             for (side, *_), group in groups.items()]
    if len({(p.device, p.dtype) for p in parts}) > 1:  # a model spread over devices or dtypes
        parts = [p.to(parts[0].device, torch.float32) for p in parts]
    return sum(parts) / (2 * len(layers))


def inject(model, targets, layer_cls=TriAdaptLinear, **layer_kwargs):
    """Freeze `model` and wrap, in place, every nn.Linear or Conv1D whose qualified name ends with a target.
    A target matches whole name components: "proj" matches "mlp.proj", not "attn.out_proj".
    Returns {qualified name: adapter layer} in the model's module order."""
    chosen = bases.targets_in(model, targets)  # [(name, layer)], or a ValueError naming what is wrong
    model.requires_grad_(False)
    layers = {}
    for name, linear in chosen:
        layers[name] = layer_cls(linear, **layer_kwargs)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layers[name])
    return layers


default_budget = lambda ref_rank, n_matrices: ref_rank * n_matrices  # R_target: r_ref a matrix on average
default_rank_step = lambda ref_rank: max(1, ref_rank // 2)             # k


class RankAllocator:
    """Grows the ranks of TriAdaptLinear layers during training, within a total-rank budget R_target.

    Call update_and_allocate(t) once a step, right after optimizer step t (t counts from 1): when a
    round is due it scores every matrix (importance()) and grows the chosen ones in place. Tensors a growth
    re-creates go into `optimizer` in the old ones' place, and their layers into `recreated` until the next
    call. `sync`, if given, maps {name: N(C)} to the dict used (rank 0's values on every process).
    """

    def __init__(self, layers, total_steps, target_total_rank=None, schedule="linear", warmup=0,
                 interval=1, rank_step=None, top_k=1, max_rank=None, sync=None, optimizer=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not layers:
            raise ValueError("RankAllocator needs at least one layer")
        self.layers = dict(layers)
        ref_rank = next(iter(self.layers.values())).ref_rank
        self.total_steps, self.schedule, self.top_k = total_steps, schedule, top_k
        self.warmup, self.interval = warmup, max(1, interval)
        self.target_total_rank = target_total_rank or default_budget(ref_rank, len(self.layers))
        self.rank_step = rank_step or default_rank_step(ref_rank)
        self.sync = sync or (lambda values: values)
        self.optimizer, self.recreated = optimizer, []  # recreated: layers whose tensors the last call re-made
        self.caps = {n: min(l.max_rank, max_rank or l.max_rank) for n, l in self.layers.items()}
        if self.total_rank > self.target_total_rank:
            raise ValueError(f"budget R_target = {self.target_total_rank} is below the initial total rank "
                             f"{self.total_rank}")
        self.prev = self.norms()  # N_l(prev)
        self.scores, self.events = {}, []  # events: (t, name, k) of every growth, in order: what resume replays

    total_rank = property(lambda self: sum(l.rank for l in self.layers.values()))

    def norms(self):
        """{name: N(C)} of every layer, through `sync`."""
        return self.sync({n: normalized_frobenius(l.core()) for n, l in self.layers.items()})

    def importance(self):
        """{name: score} at a round: how far N(C) moved since the previous round."""
        now = self.norms()
        scores, self.prev = {n: now[n] - self.prev[n] for n in now}, now
        return scores

    due = lambda self, t: t > self.warmup and t % self.interval == 0 and self.total_rank < self.target_total_rank

    def update_and_allocate(self, t):
        """The one call a step, after optimizer step t. Returns the names that grew."""
        self.recreated = []
        if not self.due(t):
            return []
        self.scores = self.importance()
        eligible = [n for n in self.layers if self.layers[n].rank < self.caps[n]]
        if not eligible:
            return []
        p = min(max((t - self.warmup) / max(1, self.total_steps - self.warmup), 0.0), 1.0)
        K = growth_count(self.schedule, p, self.target_total_rank - self.total_rank, self.top_k)
        K = min(max(K, 1), len(eligible))
        tau = sorted((self.scores[n] for n in eligible), reverse=True)[K - 1]
        # sorted() is stable: ties keep layer order
        chosen = sorted((n for n in eligible if self.scores[n] >= tau), key=lambda n: -self.scores[n])
        grown = []
        for name in chosen:
            k = min(self.rank_step, self.target_total_rank - self.total_rank, self.caps[name] - self.layers[name].rank)
            if k <= 0:
                break
            self.grow(t, name, k)
            grown.append(name)
        return grown

    def grow(self, t, name, k):
        layer, before = self.layers[name], dict(self.layers[name].named_parameters(recurse=False))
        layer.grow(k)
        self.events.append((t, name, k))
        if layer.A is not before["A"]:  # the capacity doubled: new tensors, to put in the old ones' place
            self.recreated.append(name)
            if self.optimizer is not None:
                bases.move_to_new_tensors(self.optimizer, before, dict(layer.named_parameters(recurse=False)))

    def state_dict(self):
        return {"prev": dict(self.prev), "scores": dict(self.scores), "events": list(self.events)}

    def load_state_dict(self, state):
        """Replay the recorded growths (capacities, masks, the optimizer's tensors), then restore the norms.
        Call on a freshly injected model, before loading the model's and the optimizer's state."""
        if self.events:
            raise RuntimeError("load_state_dict() needs an allocator that has not grown anything yet")
        self.recreated = []
        for t, name, k in state["events"]:
            self.grow(t, name, k)
        self.events = [tuple(e) for e in state["events"]]
        self.prev, self.scores = dict(state["prev"]), dict(state["scores"])
