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

Storage: one tensor per factor and layer, A (r, d_in), B (d_out, r), and L, U dense (r, r) with
fixed 0/1 masks L_mask, U_mask (buffers) that mark the blocks: core() = L * L_mask + U * U_mask.
The entries outside the blocks are zero and stay zero (the mask gives them no gradient, and AdamW's
decay keeps a zero at zero), so n_trainable is the closed form above, never r^2. grow(k) replaces
A, B, L, U by bordered copies (old values in the top-left corner), and RankAllocator puts them into
the optimizer in place of the old ones (replace_in_optimizer), so no param group is ever added.
Adam's moments are zero-padded for the new entries, which share the old tensor's step count t.
(Per-block parameters started their own count at 0, so a new block's first update had full size,
about lr; with the old count, bias-corrected by 1 - beta^t ~ 1 once t is a few tens, its n-th update
is about (1 - beta1^n) / sqrt(1 - beta2^n) of that: 0.45 at n = 1 with betas (0.9, 0.95), full size
from n ~ 10, a short warmup of each new block.) orthogonal_penalty stacks the factors of one shape
and takes their Gram matrices in one batched product.

Why: aten ops dispatched by one training step (bench.count_ops; forward, loss, backward,
clip_grad_norm_, fused AdamW, zero_grad; default GPT, 24 adapted matrices grown from rank 1 by 4
to 8 per matrix through the allocator in real steps):

    plain LoRA, r = 8                                    1,053
    per-block parameters (P_j, Q_j, A_j, B_j, padded
      and concatenated on every call, 43 param groups)   2,187 (2.08x), with R_orth 3,518 (3.34x)
    the same with all blocks in a single param group     2,103 (2.00x), with R_orth 3,434 (3.26x)
    this storage (1 param group)                         1,341 (1.27x), with R_orth 1,614 (1.53x)

Per-block parameters cost ops for every block (pads, concatenations and their backward slices),
so their count grows with the number of growths; this storage costs the same for any block count.
R_orth as a loop over layers cost 1,133 of those ops (2,474 in all, 2.35x); batched by shape it
costs ~20 per distinct (r, d) shape plus ~8 per layer (here 4 shapes: 273).

Variants (the flags of train.py in brackets), so that each of TriAdaptLoRA's ideas can be ablated:
  core="diagonal" [--core]         C = diag(lambda): a new block is k entries of lambda (starting at 1),
                                   and a matrix trains r (d_in + d_out) + r numbers;
  importance="sensitivity"         score = I_bar * U_bar, the smoothed sum |dW * dL/ddW| / sqrt(d_out d_in)
    [--importance]                 and its uncertainty, updated every step (RankAllocator), in place of
                                   the change of N(C) between rounds;
  block_warmup=N [--block-warmup]  a block born after step t0 learns at lr(t) * min(1, (t - t0) / N);
  advance=k [--advance]            the next block (k rows of A_next, k columns of B_next) trains ahead
                                   under a frozen core entry ADVANCE_EPS and goes live, values kept, at
                                   the matrix's next growth (dW does not change); dropped once no growth
                                   is left.
Which combination is which published method (every one keeps s constant and grows function-preservingly):

    core        importance    schedule                  extras                    method
    triangular  frobenius     linear/exponential/topk   -                         TriAdaptLoRA
    diagonal    sensitivity   topk (top-h every dt)     block warmup, advance     IncreLoRA (--schedule increlora)
    diagonal    frobenius     linear                    -                         ablation: no triangles
    triangular  sensitivity   linear                    -                         ablation: no Frobenius score
    diagonal    sensitivity   linear                    -                         ablation: neither (IncreLoRA's
                                                                                  choices, TriAdaptLoRA's threshold)
AdaLoRA, which prunes instead of growing, is in baselines.py.

Usage: see RankAllocator's docstring; `python -m pytest tests/test_triadapt.py` checks the math.
adapter_state() and load_adapter() save a trained adapter and rebuild it on a fresh base (sample.py),
merge_adapters() folds every adapter into its base weight for a plain export.
"""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULES = ("linear", "exponential", "topk")
CORES = ("triangular", "diagonal")
IMPORTANCES = ("frobenius", "sensitivity")
ADVANCE_EPS = 1e-3  # the frozen core entry of an advance block: small, so it barely moves dW; Adam's
                    # step size does not depend on the gradient's scale, so the block still trains


class TriAdaptLinear(nn.Module):
    """A frozen nn.Linear plus the triangular adapter s * B @ (L + U) @ A, each factor one tensor."""

    def __init__(self, base: nn.Linear, rank=1, alpha=16.0, ref_rank=8, init_std=0.02, core="triangular",
                 advance=0):
        super().__init__()
        if rank < 1 or rank > min(base.in_features, base.out_features):
            raise ValueError(f"rank must be in [1, {min(base.in_features, base.out_features)}], got {rank}")
        if core not in CORES:
            raise ValueError(f"unknown core {core!r}: choose one of {', '.join(CORES)}")
        self.core_kind = core
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / ref_rank
        self.ref_rank = ref_rank
        self.init_std = init_std
        self.block_sizes = []
        w = base.weight
        d_out, d_in = w.shape
        # rank 0 until grow(rank) below borders them; grow() replaces all six tensors
        self.A = nn.Parameter(w.new_zeros(0, d_in))   # (r, d_in)
        self.B = nn.Parameter(w.new_zeros(d_out, 0))  # (d_out, r)
        self.L = nn.Parameter(w.new_zeros(0, 0))      # (r, r), row block j is P_j, zero elsewhere
        self.U = nn.Parameter(w.new_zeros(0, 0))      # (r, r), column block j is Q_j, zero elsewhere
        self.register_buffer("L_mask", w.new_zeros(0, 0), persistent=False)  # (r, r), 1 on the row blocks
        self.register_buffer("U_mask", w.new_zeros(0, 0), persistent=False)  # (r, r), 1 on the column blocks
        self.merged = False
        self.track_sensitivity = False  # set by RankAllocator(importance="sensitivity")
        self.grad_dW = None             # (d_out, d_in) dL/ddW of this step while tracking
        self.grow(rank)
        self.advance = 0
        if advance:
            self._refill_advance(advance)

    @property
    def rank(self):
        return sum(self.block_sizes)

    @property
    def n_trainable(self):
        """r (d_in + d_out) + 2 sum_j k_j R_j: the numbers that train (never the masked zeros of L and U)."""
        d_out, d_in = self.base.weight.shape
        core = 2 * sum((hi - lo) * hi for lo, hi in self._block_bounds())  # 2 sum_j k_j R_j
        if self.core_kind == "diagonal":
            core = self.rank                                               # lambda: r entries
        return (self.rank + self.advance) * (d_in + d_out) + core

    def _block_bounds(self):
        """[(R_{j-1}, R_j) for every block j]."""
        R = [0] + list(itertools.accumulate(self.block_sizes))
        return list(zip(R[:-1], R[1:]))

    @property
    def P(self):
        """[P_0, P_1, ...]: views of L's row blocks, P_j = L[R_{j-1}:R_j, :R_j] (k_j, R_j)."""
        return [self.L[lo:hi, :hi] for lo, hi in self._block_bounds()]

    @property
    def Q(self):
        """[Q_0, Q_1, ...]: views of U's column blocks, Q_j = U[:R_j, R_{j-1}:R_j] (R_j, k_j)."""
        return [self.U[:hi, lo:hi] for lo, hi in self._block_bounds()]

    def core(self):
        """C = L + U; the masks keep the entries outside the blocks at zero and without a gradient."""
        return self.L * self.L_mask + self.U * self.U_mask  # (r, r)

    def _factors(self):
        """(C A, B) with the advance block, if any, appended with its frozen core ADVANCE_EPS * I."""
        CA, B = self.core() @ self.A, self.B                       # (r, d_in), (d_out, r)
        if self.advance:
            CA = torch.cat([CA, ADVANCE_EPS * self.A_next])        # (r + k, d_in)
            B = torch.cat([B, self.B_next], dim=1)                 # (d_out, r + k)
        return CA, B

    def delta_weight(self):
        CA, B = self._factors()
        return self.scale * B @ CA  # (d_out, d_in)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # ((x A^T) C^T) B^T s, with C and s applied to the small factors: C A costs r^2 d_in
        # once, where h C^T would cost r^2 per token, forward and backward; dW is never built.
        CA, B = self._factors()                    # (r, d_in), (d_out, r)
        h = x @ CA.t()                             # (..., r)
        out = h @ (self.scale * B).t()             # (..., d_out)
        if self.track_sensitivity and out.requires_grad:
            # the sensitivity sum |dW * dL/ddW| needs dL/ddW = g^T x, which the hook builds from the
            # gradient g of this output (one d_out x d_in matmul a call, like a frozen W's gradient)
            out.register_hook(lambda g, x=x.detach(): self._observe(x, g))
        return y + out

    @torch.no_grad()
    def _observe(self, x, g):
        """dL/ddW += g^T x: summed over micro-steps, so that RankAllocator.before_step() sees the step's."""
        G = g.reshape(-1, g.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()  # (d_out, d_in)
        if self.grad_dW is None:
            self.grad_dW = G
        else:
            self.grad_dW += G

    @torch.no_grad()
    def take_sensitivity(self):
        """I = sum |dW * dL/ddW| / sqrt(d_out d_in) of the gradient gathered since the last call (0 if none);
        call before the optimizer moves dW."""
        G, self.grad_dW = self.grad_dW, None
        if G is None:
            return self.A.new_zeros((), dtype=torch.float32)
        dW = self.delta_weight().float()  # (d_out, d_in)
        return (dW * G).abs().sum() / math.sqrt(dW.numel())

    @torch.no_grad()
    def grow(self, k):
        """Border the core with one row block and one column block of size k; dW does not change.

        A, B, L and U are replaced by larger tensors holding the old values in their top-left corner;
        returns the new [A, B, L, U]. An optimizer must then hold these instead of the old ones:
        RankAllocator does that (replace_in_optimizer).
        """
        if self.merged:
            raise RuntimeError("grow() on a merged layer: unmerge() first")
        d_out, d_in = self.base.weight.shape
        if k < 1 or self.rank + k > min(d_in, d_out):
            raise ValueError(f"cannot grow rank {self.rank} by {k}: the cap is min(d_in, d_out) = {min(d_in, d_out)}")
        r = self.rank  # the new rank is R = r + k
        w = self.base.weight
        eye = torch.eye(k, device=w.device, dtype=w.dtype)
        advance = min(k, getattr(self, "advance", 0))  # rows of the advance block that become live
        if advance:  # the block trained ahead goes live with its frozen eps: dW stays as it was
            A_new = torch.cat([self.A_next[:advance],
                               torch.randn(k - advance, d_in, device=w.device, dtype=w.dtype) * self.init_std])
            B_new = F.pad(self.B_next[:, :advance], (0, k - advance))
            eye[:advance, :advance] *= ADVANCE_EPS
        else:
            A_new = torch.randn(k, d_in, device=w.device, dtype=w.dtype) * self.init_std  # the one RNG draw
            B_new = w.new_zeros(d_out, k)
        A = torch.cat([self.A, A_new])          # (R, d_in)  new rows ~ N(0, init_std^2)
        B = torch.cat([self.B, B_new], dim=1)   # (d_out, R) new columns 0
        L = F.pad(self.L, (0, k, 0, k))         # (R, R)     new row block P = [0 | I_k]
        L[r:, r:] = eye
        U = F.pad(self.U, (0, k, 0, k))         # (R, R)     new column block Q = 0
        L_mask = F.pad(self.L_mask, (0, k, 0, k))  # (R, R)
        U_mask = F.pad(self.U_mask, (0, k, 0, k))  # (R, R)
        if self.core_kind == "triangular":
            L_mask[r:, :] = 1                      # rows R_{j-1}:R_j, columns 0:R_j
            U_mask[:, r:] = 1                      # rows 0:R_j, columns R_{j-1}:R_j
        else:
            L_mask[r:, r:] = torch.eye(k, device=w.device, dtype=w.dtype)  # diag(lambda) only; U unused
        self.A, self.B, self.L, self.U = (nn.Parameter(t) for t in (A, B, L, U))
        self.L_mask, self.U_mask = L_mask, U_mask
        self.block_sizes.append(k)
        if advance:
            self._refill_advance(self.advance, keep=advance)
        return list(self.parameters(recurse=False))

    @torch.no_grad()
    def _refill_advance(self, k, keep=None):
        """An advance block of size k, trained ahead of its growth under the frozen core entry ADVANCE_EPS
        (IncreLoRA's "advance learning"): the rows of the old block from `keep` on (those a smaller growth
        did not take: dW keeps their term), then fresh ones, A_next ~ N(0, init_std^2) and B_next = 0."""
        d_out, d_in = self.base.weight.shape
        w = self.base.weight
        A_old = self.A_next[keep:] if keep is not None else w.new_zeros(0, d_in)  # (k - keep, d_in)
        B_old = self.B_next[:, keep:] if keep is not None else w.new_zeros(d_out, 0)
        fresh = k - len(A_old)
        self.advance = k
        A_new = torch.randn(fresh, d_in, device=w.device, dtype=w.dtype) * self.init_std
        self.A_next = nn.Parameter(torch.cat([A_old, A_new]))                     # (k, d_in)
        self.B_next = nn.Parameter(torch.cat([B_old, w.new_zeros(d_out, fresh)], dim=1))  # (d_out, k)

    def drop_advance(self):
        """Remove the advance block (no growth is left to use it); dW loses its eps-sized term."""
        if self.advance:
            del self.A_next, self.B_next
            self.advance = 0

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
        return (f"d_in={self.base.in_features}, d_out={self.base.out_features}, core={self.core_kind}, "
                f"blocks={self.block_sizes}, advance={self.advance}, s={self.scale:g}")


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

    @property
    def n_trainable(self):
        """r (d_in + d_out)."""
        return self.rank * (self.base.in_features + self.base.out_features)

    def delta_weight(self):
        return self.scale * self.B @ self.A  # (d_out, d_in)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ (self.scale * self.B).t()  # s on the small factor, as above


def count_trainable(model):
    """Trainable numbers of `model`: adapters by n_trainable, every other trainable tensor by numel()."""
    adapters = [m for m in model.modules() if hasattr(m, "n_trainable")]  # any adapter class (baselines.py)
    own = {id(p) for m in adapters for p in m.parameters(recurse=False)}  # A, B (L, U), not the base's
    others = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in own)
    return others + sum(m.n_trainable for m in adapters)


@torch.no_grad()
def replace_in_optimizer(optimizer, old, new):
    """Put each tensor of `new` where the matching one of `old` is in the optimizer's param groups and
    move its state: state tensors shaped like the old parameter (Adam's exp_avg, exp_avg_sq) are
    zero-padded at the end of every dimension, where grow() puts the new entries; the rest (Adam's
    step) moves unchanged, so the new entries share the old tensor's step count."""
    swap = {id(o): n for o, n in zip(old, new)}
    for group in optimizer.param_groups:
        group["params"] = [swap.get(id(p), p) for p in group["params"]]
    for o, n in zip(old, new):
        state = optimizer.state.pop(o, None)
        if state is None:
            continue
        for key, v in state.items():
            if torch.is_tensor(v) and v.shape == o.shape and v.shape != n.shape:
                padded = v.new_zeros(n.shape)
                padded[tuple(slice(0, size) for size in o.shape)] = v
                state[key] = padded
        optimizer.state[n] = state


def remove_from_optimizer(optimizer, ids):
    """Take the tensors whose id() is in `ids` out of the optimizer's param groups and state."""
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in [p for p in optimizer.state if id(p) in ids]:
        del optimizer.state[p]


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
    # Both terms are ||X X^T - I_r||_F, X = A or B^T: the X of one shape go through one batched product.
    same_shape = {}
    for layer in layers:
        for X in (layer.A, layer.B.t()):
            same_shape.setdefault(tuple(X.shape), []).append(X)
    total = 0.0
    for (r, _), Xs in same_shape.items():
        X = torch.stack(Xs)                                                  # (n_shape, r, d)
        I = torch.eye(r, device=X.device, dtype=X.dtype)
        total = total + torch.linalg.matrix_norm(torch.bmm(X, X.mT) - I).sum()  # (n_shape,) summed
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


def adapter_state(layers):
    """{name: factors}: what a trained adapter is, on the CPU. A TriAdaptLinear entry holds its
    block_sizes and A, B, L, U (L and U dense, their masked entries zero); a LoRALinear one its rank,
    A and B. load_adapter() rebuilds the layers from it; the base weights are not in it."""
    state = {}
    for name, layer in layers.items():
        if isinstance(layer, TriAdaptLinear):
            entry = {"block_sizes": list(layer.block_sizes), "core": layer.core_kind, "L": layer.L, "U": layer.U}
            if layer.advance:  # the advance block is part of dW (its eps-sized term)
                entry.update(A_next=layer.A_next, B_next=layer.B_next)
        elif hasattr(layer, "adapter_entry"):  # a baseline's layer (baselines.py) says what it is
            entry = layer.adapter_entry()
        else:
            entry = {"rank": layer.rank}
        entry.update(A=layer.A, B=layer.B)
        state[name] = {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v  # a copy: training goes on
                       for k, v in entry.items()}
    return state


def load_adapter(model, state, alpha=16.0, ref_rank=8, builders=None):
    """Wrap, in place, the linears of `model` named in `state` (adapter_state's output) and load their
    factors. A TriAdaptLinear is rebuilt as training left it: made at its first block's size, grown by
    each later block (the masks follow from the sizes), then loaded. `builders` maps an entry's "kind"
    (a baseline's layer) to a function (model, name, entry) -> layer. Returns {name: layer}."""
    layers = {}
    for name, entry in state.items():
        if "kind" in entry:
            if entry["kind"] not in (builders or {}):
                raise ValueError(f"{name}: no builder for adapter kind {entry['kind']!r}")
            layers[name] = builders[entry["kind"]](model, name, entry)
            continue
        if "block_sizes" in entry:
            first, *rest = entry["block_sizes"]
            advance = len(entry["A_next"]) if "A_next" in entry else 0
            (layer,) = inject(model, [name], rank=first, alpha=alpha, ref_rank=ref_rank,
                              core=entry.get("core", "triangular"), advance=advance).values()
            for k in rest:
                layer.grow(k)  # its random A rows are overwritten below
        else:
            (layer,) = inject(model, [name], layer_cls=LoRALinear, rank=entry["rank"], alpha=alpha).values()
        with torch.no_grad():
            for key in ("A", "B", "L", "U", "A_next", "B_next"):
                if key in entry:
                    p = getattr(layer, key)
                    if p.shape != entry[key].shape:
                        raise ValueError(f"{name}.{key} is saved as {tuple(entry[key].shape)}, "
                                         f"but its block sizes make it {tuple(p.shape)}")
                    p.copy_(entry[key])
        layers[name] = layer
    return layers


@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter of `model` into its base weight (W <- W + dW) and put that plain nn.Linear back
    in the adapter's place, so that the state_dict has the keys of the model without adapters."""
    adapters = [(n, m) for n, m in model.named_modules() if hasattr(m, "delta_weight")]
    for name, layer in adapters:
        if not getattr(layer, "merged", False):
            layer.base.weight += layer.delta_weight().to(layer.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model


class RankAllocator:
    """Grows the ranks of TriAdaptLinear layers during training, within a total-rank budget.

    Usage, with `layers = inject(model, targets)` and an optimizer over the trainable parameters:

        allocator = RankAllocator(layers, total_steps=T, warmup=100, interval=10)
        for t in range(1, T + 1):
            loss = model(x, y) + lam * orthogonal_penalty(layers); loss.backward()
            allocator.before_step(t)           # needed with block_warmup or importance="sensitivity"
            optimizer.step()
            if allocator.step(t, optimizer):   # grown tensors replace the old ones in the optimizer
                params = [p for p in model.parameters() if p.requires_grad]
            optimizer.zero_grad()

    importance="frobenius" scores a matrix by how much N(C) = ||C||_F / r moved since the last round
    (TriAdaptLoRA); "sensitivity" by IncreLoRA's smoothed sensitivity x uncertainty of dW, measured at
    every step from I = sum |dW * dL/ddW| / sqrt(d_out d_in):

        I_bar <- b1 I_bar + (1 - b1) I,   U_bar <- b2 U_bar + (1 - b2) |I - I_bar|,   score = I_bar U_bar

    (U_bar uses the I_bar just updated; before_step() measures I, summed over micro-steps and, through
    `reduce`, over processes before the abs, so it is the whole batch's). block_warmup = N scales the
    update of a block born after step t0 by min(1, (t - t0) / N) at step t: the learning rate it sees is
    lr(t) min(1, (t - t0) / N).
    Layers made with advance=k train their next block ahead; once the budget is spent it is dropped.
    `sync`, if given, maps the dict {name: score or N(C)} measured at construction and at every round
    to the dict used (e.g. rank 0's values broadcast to every process, so all make the same decision).
    """

    def __init__(self, layers, total_steps, target_total_rank=None, schedule="linear", warmup=0,
                 interval=1, rank_step=None, top_k=1, max_rank=None, sync=None, importance="frobenius",
                 betas=(0.85, 0.85), block_warmup=0, reduce=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if importance not in IMPORTANCES:
            raise ValueError(f"unknown importance {importance!r}: choose one of {', '.join(IMPORTANCES)}")
        if not layers:
            raise ValueError("RankAllocator needs at least one layer")
        self.layers = dict(layers)
        ref_rank = next(iter(self.layers.values())).ref_rank
        self.total_steps, self.schedule, self.importance = total_steps, schedule, importance
        self.warmup, self.interval, self.top_k = warmup, max(1, interval), top_k
        self.target_total_rank = target_total_rank or ref_rank * len(self.layers)  # R_target
        self.rank_step = rank_step or max(1, ref_rank // 2)                        # k
        self.sync = sync or (lambda norms: norms)
        self.betas, self.block_warmup, self.reduce = betas, block_warmup, reduce
        cap = max_rank or float("inf")
        self.caps = {n: min(l.base.in_features, l.base.out_features, cap) for n, l in self.layers.items()}
        if self.total_rank > self.target_total_rank:
            raise ValueError(f"budget R_target = {self.target_total_rank} is below the initial total rank "
                             f"{self.total_rank}")
        for layer in self.layers.values():
            layer.track_sensitivity = importance == "sensitivity"
        device = next(iter(self.layers.values())).A.device
        self.I_bar = torch.zeros(len(self.layers), device=device)  # (n_layers,) sensitivity averages
        self.U_bar = torch.zeros(len(self.layers), device=device)  # (n_layers,) uncertainty averages
        self.prev = self.norms() if importance == "frobenius" else {}  # N_l(prev)
        self.scores = {}
        self.events = []  # (t, name, k) of every growth, in order: what resume replays
        self._young = []  # [(layer, block lo, hi, born t0, saved slices)]: blocks still in their warmup
        self._sensitivity = None  # (n_layers,) measured by before_step(), used by step()
        self._drop_spent_advance()

    @property
    def total_rank(self):
        return sum(l.rank for l in self.layers.values())

    def rank_pattern(self):
        return {n: l.rank for n, l in self.layers.items()}

    def norms(self):
        """{name: N(C)} of every layer, through `sync`."""
        return self.sync({n: normalized_frobenius(l.core()) for n, l in self.layers.items()})

    @torch.no_grad()
    def before_step(self, t):
        """Call right before optimizer step t, after the backward: measures the sensitivity (it needs the
        dW that the gradient belongs to) and remembers the young blocks' values (block_warmup)."""
        if any(l.track_sensitivity for l in self.layers.values()):
            if self.reduce is not None:  # several processes: each has dL/ddW of its share of the batch
                self.reduce([l.grad_dW for l in self.layers.values() if l.grad_dW is not None])
            self._sensitivity = torch.stack([l.take_sensitivity() for l in self.layers.values()])  # (n_layers,)
        self._young = [(l, lo, hi, t0, [p[sl].clone() for p, sl in self._block_slices(l, lo, hi)])
                       for l, lo, hi, t0, _ in self._young if t - t0 < self.block_warmup]

    @staticmethod
    def _block_slices(layer, lo, hi):
        """Where block lo:hi lives: rows of A and L (P_j), columns of B and U (Q_j)."""
        cols = (slice(None), slice(lo, hi))
        return [(layer.A, slice(lo, hi)), (layer.B, cols), (layer.L, slice(lo, hi)), (layer.U, cols)]

    @torch.no_grad()
    def _warm_up_blocks(self, t):
        for layer, lo, hi, t0, saved in self._young:
            f = min(1.0, (t - t0) / self.block_warmup)
            for (p, sl), before in zip(self._block_slices(layer, lo, hi), saved):
                p[sl] = before + f * (p[sl] - before)  # the update at lr(t) f instead of lr(t)

    @torch.no_grad()
    def _observe(self):
        b1, b2 = self.betas
        I, self._sensitivity = self._sensitivity, None  # (n_layers,) this step's, from before_step()
        if I is None:
            raise RuntimeError("importance='sensitivity' needs allocator.before_step(t) before optimizer.step()")
        self.I_bar.mul_(b1).add_((1 - b1) * I)
        self.U_bar.mul_(b2).add_((1 - b2) * (I - self.I_bar).abs())

    def step(self, t, optimizer):
        """Call right after optimizer step t (t counts from 1), before zero_grad. Returns the names that
        grew."""
        if self._young:
            self._warm_up_blocks(t)
        if self.importance == "sensitivity" and self.total_rank < self.target_total_rank:
            self._observe()
        if t <= self.warmup or t % self.interval or self.total_rank >= self.target_total_rank:
            return []
        if self.importance == "frobenius":
            now = self.norms()
            self.scores = {n: now[n] - self.prev[n] for n in now}
            self.prev = now
        else:
            self.scores = self.sync(dict(zip(self.layers, (self.I_bar * self.U_bar).tolist())))
        eligible = [n for n, l in self.layers.items() if l.rank < self.caps[n]]
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
            layer = self.layers[name]
            k = min(self.rank_step, self.target_total_rank - self.total_rank, self.caps[name] - layer.rank)
            if k <= 0:
                break
            self._grow(t, name, k, optimizer)
            self.events.append((t, name, k))
            grown.append(name)
        self._drop_spent_advance(optimizer)
        return grown

    def _grow(self, t, name, k, optimizer):
        layer = self.layers[name]
        old = list(layer.parameters(recurse=False))
        new = layer.grow(k)
        replace_in_optimizer(optimizer, old, new)
        if layer.advance:  # the refilled advance block is new: its Adam moments start from zero
            for p in (layer.A_next, layer.B_next):
                for key, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.zero_()
        if self.block_warmup:
            self._young.append((layer, layer.rank - k, layer.rank, t, None))

    def _drop_spent_advance(self, optimizer=None):
        """Advance blocks are dropped once no growth is left for them (budget spent, or at the cap), and
        sensitivity is no longer measured once the budget is spent (it decides nothing any more)."""
        if self.total_rank >= self.target_total_rank:
            for layer in self.layers.values():
                layer.track_sensitivity, layer.grad_dW = False, None
        for name, layer in self.layers.items():
            spent = self.total_rank >= self.target_total_rank or layer.rank >= self.caps[name]
            if getattr(layer, "advance", 0) and spent:
                gone = {id(layer.A_next), id(layer.B_next)}
                layer.drop_advance()
                if optimizer is not None:
                    remove_from_optimizer(optimizer, gone)

    def state_dict(self):
        return {"prev": dict(self.prev), "scores": dict(self.scores), "events": list(self.events),
                "I_bar": self.I_bar.tolist(), "U_bar": self.U_bar.tolist()}  # float32 -> float -> float32 is exact

    def load_state_dict(self, state, optimizer):
        """Replay the recorded growths (shapes, and the tensors the optimizer holds), then restore the norms.

        Call on a freshly injected model before loading the model's and the optimizer's state.
        """
        if self.events:
            raise RuntimeError("load_state_dict() needs an allocator that has not grown anything yet")
        for t, name, k in state["events"]:
            self._grow(t, name, k, optimizer)
        self._drop_spent_advance(optimizer)
        self.events = [tuple(e) for e in state["events"]]
        self.prev, self.scores = dict(state["prev"]), dict(state["scores"])
        if "I_bar" in state:
            self.I_bar.copy_(torch.tensor(state["I_bar"]))
            self.U_bar.copy_(torch.tensor(state["U_bar"]))
