"""
The paper's competitors, built from triadapt.py's pieces: LoRA, AdaLoRA and IncreLoRA (with the
switches that ablate TriAdaptLoRA's two ideas). Every one keeps s constant and starts from B = 0.

LoRA (Hu et al., 2021): y = x W^T + b + (x A^T) (s B)^T with s = alpha / r, A ~ N(0, init_std^2), B = 0,
at the fixed rank r = r_ref. It trains r (d_in + d_out) numbers per matrix.

AdaLoRA (Zhang et al., 2023) adapts a frozen linear layer in an SVD-like form whose triplets
(A[i], E[i], B[:, i]) are pruned during training to a total-rank budget:

    y  = x W^T + b + ((x A^T) * E) (s B)^T        # forward(): dW is never built
    dW = s * B @ diag(E) @ A                      # delta_weight(), for merge() and inspection

with A (r x d_in), B (d_out x r), E (r,) and a constant s = alpha / r_ref. At injection A, B ~
N(0, init_std^2) and E = 0, so dW = 0; E trains from step 1, A and B from step 2 (their gradients carry
a factor E). Every step t, for every entry w of A, B and E (dL/dw the clipped gradient of step t):

    I     = |w * dL/dw|                           # sensitivity
    I_bar = b1 * I_bar + (1 - b1) * I             # smoothed sensitivity
    U_bar = b2 * U_bar + (1 - b2) * |I - I_bar|   # uncertainty, against the I_bar just updated
    S     = I_bar * U_bar

and triplet i of a layer scores S_E[i] + mean_j S_A[i, j] + mean_k S_B[k, i]. The budget b(t) falls
from the initial total rank R_0 = sum of the layers' r to the target R_T (r_ref per layer by default)
along a cubic, with t_i = init_warmup, t_e = T - t_f (t_f = final_warmup, T = total_steps), D = t_e - t_i
(both clamped, see below):

    b(t) = R_0                                    t <= t_i
    b(t) = R_T + floor((R_0 - R_T) * (t_e - t)^3 / D^3)     t_i < t <= t_e,  i.e. (1 - (t - t_i) / D)^3
    b(t) = R_T                                    t > t_e

For t_i < t <= t_e and t % interval == 0 the b(t) triplets with the highest scores over all layers stay
live, the E entries of the others are set to 0. Those still train (their A, B and E get gradients) and
can come back at the next masking. At the first step after t_e the mask is chosen once more, to exactly
R_T triplets, and from then on E[~live] = 0 after every step: the adapter ends with R_T live triplets.
The loss adds lambda * R_orth on A and B (triadapt.orthogonal_penalty reads A, B, gram_mask).
Choices where the paper and PEFT are ambiguous or differ:
  - U_bar uses the I_bar of this step (the paper's equations and PEFT's RankAllocator do the same);
  - I_bar, U_bar are updated every step, warmups included, so scores are warm at the first masking;
  - the budget is an integer computed exactly (floor of a rational, no float noise), as PEFT's int();
  - exactly b(t) triplets stay live: ties are broken by layer order, then index (PEFT's threshold
    E <= kthvalue masks every tied entry and can leave fewer);
  - t_e = min(max(t_i, T - t_f), T - 1) and t_i = min(init_warmup, t_e): step T at the latest fixes
    the final mask, so every run ends with R_T live triplets, even one shorter than its warmups;
  - the moving averages are lerps (I_bar + (1 - b1) (I - I_bar)): one fused op for all tensors.
Parameters: r (d_in + d_out + 1) train all along (n_held); live * (d_in + d_out + 1) make up the final
adapter (n_trainable).

IncreLoRA (Zhang et al., 2023) is TriAdaptLoRA's growth with other choices, each a switch here, so
that every idea of TriAdaptLoRA can be ablated (train.py's flags in brackets):
  core="diagonal" [--core]          C = diag(lambda): a block of size k is k entries lambda = 1, and a
                                    matrix trains r (d_in + d_out) + r numbers;
  importance="sensitivity"          score = I_bar * U_bar of I = sum |dW * dL/ddW| / sqrt(d_out d_in),
    [--importance]                  smoothed as AdaLoRA's, measured every step, instead of how far N(C)
                                    moved between rounds;
  block_warmup=N [--block-warmup]   a block born after step t0 learns at lr(t) * min(1, (t - t0) / N);
  advance=k [--advance]             the next block (k rows of A, k columns of B past r) trains ahead
                                    behind a frozen core entry ADVANCE_EPS and goes live, values kept, at
                                    the matrix's next growth (dW does not change); dropped once no growth
                                    is left for it.
IncreLoRA itself (--schedule increlora) is all four with the topk schedule (the top-h every dt).
Everything lives in TriAdaptLinear's fixed-shape storage: the advance block is rows r..r+k of A, and
its frozen entry a buffer `ahead` added to the scaled core.

Usage, with `layers = triadapt.inject(model, targets, layer_cls=IncreLoRALinear, core="diagonal", advance=4)`:

    allocator = IncreLoRAAllocator(layers, total_steps=T, schedule="topk", importance="sensitivity",
                                   block_warmup=10, optimizer=opt)   # opt: kept right, new blocks' moments reset
    ...  # then the loop of triadapt.RankAllocator: update_and_allocate(t) after every optimizer step

`python -m pytest tests/test_baselines.py tests/test_variants.py` checks the math against hand values.
"""
import math

import torch
import torch.nn as nn

import bases
import triadapt

# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """Plain LoRA in the same code path: y = x W^T + b + (alpha / r) * (x A^T) B^T."""
    KIND = "lora"

    def __init__(self, base, rank=8, alpha=16.0, init_std=0.02, fan_in_fan_out=None):
        super().__init__()
        self.d_out, self.d_in, self.fan_in_fan_out = bases.base_shape(base, fan_in_fan_out)
        self.base = base.requires_grad_(False)
        self.alpha, self.scale, self.rank, self.merged = alpha, alpha / rank, rank, False
        kw = dict(device=base.weight.device, dtype=bases.adapter_dtype(base.weight))
        self.A = nn.Parameter(torch.randn(rank, self.d_in, **kw) * init_std)  # (r, d_in)
        self.B = nn.Parameter(torch.zeros(self.d_out, rank, **kw))            # (d_out, r)

    @property
    def n_trainable(self):
        """r (d_in + d_out)."""
        return self.rank * (self.d_in + self.d_out)

    def delta_weight(self):
        return self.scale * self.B @ self.A  # (d_out, d_in)

    def forward(self, x):
        y = self.base(x)
        return y if self.merged else y + bases.adapter_out(x, self.A, self.scale * self.B, y.dtype)

    merge = lambda self: bases.merge_into_base(self, 1)
    unmerge = lambda self: bases.merge_into_base(self, -1)

    def lora_factors(self):
        """(lora_A, lora_B) = (A, s B): their product is delta_weight()."""
        return self.A.detach(), (self.scale * self.B).detach()

    def adapter_entry(self):
        return {"kind": self.KIND, "alpha": self.alpha, "rank": self.rank, "fan_in_fan_out": self.fan_in_fan_out,
                "A": self.A, "B": self.B}

    @classmethod
    @torch.no_grad()
    def from_entry(cls, base, entry):
        layer = cls(base, rank=entry["rank"], alpha=entry["alpha"], fan_in_fan_out=entry["fan_in_fan_out"])
        bases.copy_into({"A": layer.A, "B": layer.B}, entry)
        return layer


# ----------------------------------------------------------------------------- AdaLoRA

class AdaLoRALinear(nn.Module):
    """A frozen nn.Linear plus AdaLoRA's adapter s * B @ diag(E) @ A; `live` marks the kept triplets."""

    KIND = "adalora"

    def __init__(self, base, rank, alpha=16.0, ref_rank=8, init_std=0.02, fan_in_fan_out=None):
        super().__init__()
        d_out, d_in, self.fan_in_fan_out = bases.base_shape(base, fan_in_fan_out)
        if rank < 1 or rank > min(d_in, d_out):
            raise ValueError(f"rank must be in [1, {min(d_in, d_out)}], got {rank}")
        self.base = base.requires_grad_(False)
        self.d_out, self.d_in, self.alpha, self.scale = d_out, d_in, alpha, alpha / ref_rank
        self.ref_rank = ref_rank
        self.init_std = init_std
        w = base.weight
        kw = dict(device=w.device, dtype=bases.adapter_dtype(w))
        self.A = nn.Parameter(torch.randn(rank, d_in, **kw) * init_std)   # (r, d_in)
        self.B = nn.Parameter(torch.randn(d_out, rank, **kw) * init_std)  # (d_out, r)
        self.E = nn.Parameter(torch.zeros(rank, **kw))                    # (r,)
        # persistent: a resumed run must mask the same triplets in its final phase
        self.register_buffer("live", torch.ones(rank, dtype=torch.bool, device=w.device))  # (r,)
        self._live_count = rank  # a host copy of live.sum(), so that reading `rank` never syncs
        self.register_buffer("gram_mask", torch.ones(rank, rank, **kw), persistent=False)  # (r, r) for R_orth
        self.merged = False

    @property
    def rank(self):
        """The number of live triplets."""
        return self._live_count

    @property
    def n_trainable(self):
        """live * (d_in + d_out + 1): what the adapter holds at the end."""
        return self.rank * (self.d_in + self.d_out + 1)

    @property
    def n_held(self):
        """r * (d_in + d_out + 1): what trains, since masked triplets keep training and may revive."""
        return self.A.shape[0] * (self.d_in + self.d_out + 1)

    @torch.no_grad()
    def set_live(self, live):
        """Keep the triplets marked True, set E of the others to 0. A CPU `live` costs no host sync."""
        self._live_count = int(live.sum())
        self.live.copy_(live)
        self.E.mul_(self.live)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._live_count = int(self.live.sum())  # the one sync, at load

    def delta_weight(self):
        return self.scale * (self.B * self.E) @ self.A  # (d_out, d_in)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        h = (bases.to_adapter_dtype(x, self.A) @ self.A.t()) * self.E    # (..., r)
        out = h @ (self.scale * self.B).t()                                  # (..., d_out), s on the small factor
        return y + (out if out.dtype == y.dtype else out.to(y.dtype))

    merge = lambda self: bases.merge_into_base(self, 1)
    unmerge = lambda self: bases.merge_into_base(self, -1)

    def lora_factors(self):
        """(lora_A, lora_B) = (A, s B E) on the live triplets: their product is delta_weight()."""
        return self.A[self.live].detach(), (self.scale * (self.B * self.E))[:, self.live].detach()

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.A.shape[0]}, live={self.rank}, s={self.scale:g}"

    def adapter_entry(self):
        """This layer's kind, settings and values; from_entry() rebuilds it."""
        return {"kind": self.KIND, "alpha": self.alpha, "ref_rank": self.ref_rank,
                "fan_in_fan_out": self.fan_in_fan_out, "A": self.A, "B": self.B, "E": self.E, "live": self.live}

    @classmethod
    def from_entry(cls, base, entry):
        layer = cls(base, rank=len(entry["E"]), alpha=entry["alpha"], ref_rank=entry["ref_rank"],
                    fan_in_fan_out=entry["fan_in_fan_out"])
        bases.copy_into({"A": layer.A, "B": layer.B, "E": layer.E}, entry)
        layer.set_live(entry["live"].to(layer.live.device))
        return layer


default_adalora_rank = lambda ref_rank: max(1, (3 * ref_rank) // 2)  # a matrix's first triplets: 1.5 r_ref
default_final_warmup = lambda total_steps: total_steps // 6          # t_f


class AdaLoRAAllocator:
    """Scores the triplets of AdaLoRALinear layers and masks them down to the cubic budget b(t).

    Called like triadapt.RankAllocator, update_and_allocate(t) once per optimizer step t, before
    zero_grad(), since it reads p.grad. No tensor changes shape.
    `sync`, if given, maps the dict {name: triplet scores (r,)} of a masking step to the dict used
    (e.g. rank 0's values broadcast to every process, so all keep the same triplets).
    """

    def __init__(self, layers, total_steps, target_total_rank=None, init_warmup=0, final_warmup=None,
                 interval=1, beta1=0.85, beta2=0.85, sync=None, optimizer=None):
        if not layers:
            raise ValueError("AdaLoRAAllocator needs at least one layer")
        self.layers = dict(layers)
        ref_rank = next(iter(self.layers.values())).ref_rank
        self.total_steps, self.interval = total_steps, max(1, interval)
        self.init_warmup = init_warmup                                                  # as given
        self.final_warmup = default_final_warmup(total_steps) if final_warmup is None else final_warmup
        # step T at the latest fixes the final mask, so every run ends with R_T live triplets
        self.mask_end = min(max(init_warmup, total_steps - self.final_warmup), total_steps - 1)  # t_e
        self.mask_start = min(init_warmup, self.mask_end)                                        # t_i
        self.initial_total_rank = sum(l.A.shape[0] for l in self.layers.values())     # R_0
        self.target_total_rank = target_total_rank or triadapt.default_budget(ref_rank, len(self.layers))
        if not 1 <= self.target_total_rank <= self.initial_total_rank:
            raise ValueError(f"target total rank {self.target_total_rank} must be in [1, "
                             f"{self.initial_total_rank}], the initial total rank")
        self.beta1, self.beta2 = beta1, beta2
        self.sync = sync or (lambda scores: scores)
        self.params = [(n, key, getattr(l, key)) for n, l in self.layers.items() for key in ("A", "B", "E")]
        # float32 whatever the parameters' dtype: the averages of tiny products underflow in bf16
        self.I_bar = [torch.zeros_like(p, dtype=torch.float32) for _, _, p in self.params]
        self.U_bar = [torch.zeros_like(p, dtype=torch.float32) for _, _, p in self.params]
        self.final_mask_set = False
        self.optimizer, self.recreated = optimizer, []  # no tensor is ever re-created: the API of RankAllocator
        self.scores = {}  # {name: triplet scores (r,)} of the last masking, on the CPU, for reports
        self.events = []  # (t, name, live count) whenever a layer's live count changes

    @property
    def total_rank(self):
        return sum(l.rank for l in self.layers.values())

    def budget(self, t):
        """b(t): R_0 up to t_i, the cubic down to R_T at t_e, R_T after; integer arithmetic, floored."""
        R0, RT, ti, te = self.initial_total_rank, self.target_total_rank, self.mask_start, self.mask_end
        if t <= ti:
            return R0
        if t > te:
            return RT
        return RT + (R0 - RT) * (te - t) ** 3 // (te - ti) ** 3

    @torch.no_grad()
    def update_importance(self):
        """I_bar and U_bar of every entry of A, B, E from the current p and p.grad, all on the device."""
        grads = [p.grad for _, _, p in self.params]
        if any(g is None for g in grads):
            missing = [f"{n}.{key}" for (n, key, _), g in zip(self.params, grads) if g is None]
            raise RuntimeError(f"no gradient for {', '.join(missing)}: call update_and_allocate(t) after "
                               f"optimizer.step() and before optimizer.zero_grad()")
        I = torch._foreach_mul([p.float() for _, _, p in self.params], [g.float() for g in grads])
        torch._foreach_abs_(I)
        torch._foreach_lerp_(self.I_bar, I, 1 - self.beta1)
        spread = torch._foreach_sub(I, self.I_bar)  # against the new I_bar, as the paper and PEFT
        torch._foreach_abs_(spread)
        torch._foreach_lerp_(self.U_bar, spread, 1 - self.beta2)

    @torch.no_grad()
    def triplet_scores(self):
        """{name: (r,)}: S_E[i] + mean of S_A's row i + mean of S_B's column i, S = I_bar * U_bar."""
        S = torch._foreach_mul(self.I_bar, self.U_bar)
        scores = {}
        for i, name in enumerate(self.layers):
            S_A, S_B, S_E = S[3 * i: 3 * i + 3]                           # (r, d_in), (d_out, r), (r,)
            scores[name] = S_E + S_A.mean(dim=1) + S_B.mean(dim=0)        # (r,)
        return scores

    def mask_to(self, t, budget):
        """Keep the `budget` triplets with the highest scores over all layers; returns the changed names."""
        scores = self.sync(self.triplet_scores())
        self.scores = {n: scores[n].detach().float().cpu() for n in self.layers}  # the one host sync
        flat = torch.cat(list(self.scores.values()))                           # (R_0,)
        # stable on -score: ties keep their order in flat (layer order, then index), so exactly `budget`
        order = torch.argsort(-flat, stable=True)                              # (R_0,)
        keep = torch.zeros(flat.shape, dtype=torch.bool)                       # (R_0,)
        keep[order[:budget]] = True
        changed = []
        sizes = [l.A.shape[0] for l in self.layers.values()]
        for (name, layer), live in zip(self.layers.items(), keep.split(sizes)):
            before = layer.rank
            layer.set_live(live)
            if layer.rank != before:
                self.events.append((t, name, layer.rank))
                changed.append(name)
        return changed

    def update_and_allocate(self, t):
        """Call right after optimizer step t (t counts from 1), before zero_grad(). Returns the names whose
        live count changed."""
        if not self.final_mask_set:  # once the pattern is fixed the scores decide nothing
            self.update_importance()
        if t <= self.mask_start:
            return []
        if t <= self.mask_end:
            return self.mask_to(t, self.budget(t)) if t % self.interval == 0 else []
        if not self.final_mask_set:
            self.final_mask_set = True
            return self.mask_to(t, self.target_total_rank)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.E.mul_(layer.live)  # masked entries trained this step: back to 0, no host sync
        return []

    def state_dict(self):
        """I_bar, U_bar (CPU copies), the phase and the events; the live masks are in the model's state."""
        keys = [f"{n}.{key}" for n, key, _ in self.params]
        cpu = lambda ts: {k: v.detach().to("cpu", copy=True) for k, v in zip(keys, ts)}
        return {"I_bar": cpu(self.I_bar), "U_bar": cpu(self.U_bar), "final_mask_set": self.final_mask_set,
                "scores": dict(self.scores), "events": list(self.events)}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Restore the moving averages and the phase (the live masks come with the model's state)."""
        keys = [f"{n}.{key}" for n, key, _ in self.params]
        for name, mine in (("I_bar", self.I_bar), ("U_bar", self.U_bar)):
            for k, v in zip(keys, mine):
                v.copy_(state[name][k])
        self.final_mask_set = bool(state["final_mask_set"])
        self.scores = dict(state["scores"])
        self.events = [tuple(e) for e in state["events"]]


# ----------------------------------------------------------------------------- IncreLoRA

CORES = ("triangular", "diagonal")
IMPORTANCES = ("frobenius", "sensitivity")
ADVANCE_EPS = 1e-3  # the frozen core entry of an advance block: small, so it barely moves dW; Adam's
                    # step size does not depend on the gradient's scale, so the block still trains


class IncreLoRALinear(triadapt.TriAdaptLinear):
    """TriAdaptLinear with IncreLoRA's switches: a diagonal core, sensitivity tracking, an advance block.

    It overrides TriAdaptLinear's hooks: _allocate() adds the buffer `ahead`, reserve() makes room for the
    advance block too, fresh_rows() keeps the rows it holds, open_block() opens a diagonal core; grow()
    then gives the rows that went live their eps as their core entry and refills the advance block.
    first_block() waits until __init__ has set the core and the advance block that these hooks read."""

    KIND = "increlora"

    def __init__(self, base, rank=1, alpha=16.0, ref_rank=8, init_std=0.02, core="triangular", advance=0,
                 fan_in_fan_out=None):
        if core not in CORES:
            raise ValueError(f"unknown core {core!r}: choose one of {', '.join(CORES)}")
        super().__init__(base, rank, alpha, ref_rank, init_std, fan_in_fan_out)
        self.core_kind, self.advance = core, 0
        self.track_sensitivity = False  # set by IncreLoRAAllocator(importance="sensitivity")
        self.grad_dW = self._dW = None  # (d_out, d_in): dL/ddW of this step, and dW before the step
        self.frozen_ahead = advance > 0  # a Python flag read by forward: changes once, at drop_advance()
        super().first_block(rank)
        if advance:
            self.reserve(rank + advance)  # self.advance, which reserve() adds, is 0 until fill_advance()
            self.fill_advance(advance)

    def first_block(self, rank):
        """Deferred: __init__ opens it once core_kind and advance are set."""

    @property
    def n_trainable(self):
        core = self.rank if self.core_kind == "diagonal" else 2 * sum((hi - lo) * hi for lo, hi in self.blocks())
        return (self.rank + self.advance) * (self.d_in + self.d_out) + core

    def scaled_core(self):
        sC = super().scaled_core()                          # (c, c)
        return sC + self.ahead if self.frozen_ahead else sC

    def _allocate(self, c):
        super()._allocate(c)  # reserve() copies `ahead` into its new corner, as every buffer
        self.register_buffer("ahead", torch.zeros_like(self.L), persistent=False)  # (c, c), s eps on advance

    def reserve(self, n):
        """As TriAdaptLinear's, with room for the advance block past the n rows."""
        super().reserve(n + self.advance)

    def fresh_rows(self, lo, hi):
        """As TriAdaptLinear's, but the rows the advance block holds (r:r + advance) keep their values."""
        super().fresh_rows(max(lo, self.rank + self.advance), hi)

    def open_block(self, lo, hi):
        if self.core_kind == "triangular":
            return super().open_block(lo, hi)
        diag = torch.arange(lo, hi)
        self.L_mask[diag, diag] = self.scale  # diag(lambda) only: U is never used
        self.gram_mask[:hi, :hi] = 1

    @torch.no_grad()
    def grow(self, k):
        """As TriAdaptLinear.grow; the new block's first rows are the advance block's: they go live with their
        trained values (fresh_rows skips them) and their frozen eps as their core entry, so dW does not
        change. Then the advance block is refilled."""
        r, a = self.rank, self.advance
        super().grow(k)
        if a:
            live = range(r, r + min(k, a))
            self.L[live, live] = ADVANCE_EPS  # s eps, as in `ahead`: now it trains
            self.advance -= len(live)         # the rows it still holds, past the new rank
            self.fill_advance(a)

    @torch.no_grad()
    def fill_advance(self, n):
        """The advance block, n rows past the rank (fewer at the cap): the rows it still holds keep their
        values, the others are fresh (fresh_rows); each has the frozen core entry s eps, in `ahead`."""
        r = self.rank
        n = min(n, self.capacity - r)
        self.fresh_rows(r, r + n)
        self.advance = n
        self.ahead.zero_()
        self.ahead[range(r, r + n), range(r, r + n)] = self.scale * ADVANCE_EPS

    @torch.no_grad()
    def drop_advance(self):
        """No growth is left for the advance block: zero it (dW loses its eps-sized term)."""
        r, a = self.rank, self.advance
        self.A[r:r + a] = 0
        self.B[:, r:r + a] = 0
        self.ahead.zero_()
        self.advance, self.frozen_ahead = 0, False

    def forward(self, x):
        y = super().forward(x)
        if self.track_sensitivity and y.requires_grad:
            # the sensitivity sum |dW * dL/ddW| needs dL/ddW = g^T x: the hook builds it from the gradient g
            # of this output (one d_out x d_in matmul a call, like a frozen W's gradient)
            y.register_hook(lambda g, x=x.detach(): self._observe(x, g))
        return y

    @torch.no_grad()
    def _observe(self, x, g):
        """dL/ddW += g^T x, summed over micro-steps; and dW before the optimizer moves it (once a step)."""
        if self._dW is None:
            self._dW = self.delta_weight().float()                                          # (d_out, d_in)
        G = g.reshape(-1, g.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()  # (d_out, d_in)
        self.grad_dW = G if self.grad_dW is None else self.grad_dW.add_(G)

    @torch.no_grad()
    def take_sensitivity(self):
        """I = sum |dW * dL/ddW| / sqrt(d_out d_in) of the gradient gathered since the last call (0 if none)."""
        G, dW, self.grad_dW, self._dW = self.grad_dW, self._dW, None, None
        if G is None:
            return self.A.new_zeros((), dtype=torch.float32)
        return (dW * G).abs().sum() / math.sqrt(dW.numel())

    def lora_factors(self):
        """As TriAdaptLinear's, over the rank and the advance block (its eps-sized term is part of dW)."""
        n = self.rank + self.advance
        return (self.scaled_core()[:n, :n] @ self.A[:n]).detach(), self.B[:, :n].detach()

    def adapter_entry(self):
        """TriAdaptLinear's entry, with the core's kind and the advance block (A_next, B_next: k rows)."""
        r, a = self.rank, self.advance
        return {**super().adapter_entry(), "core": self.core_kind, "advance": a,
                "A_next": self.A[r:r + a], "B_next": self.B[:, r:r + a]}

    @classmethod
    def from_entry(cls, base, entry):
        return super().from_entry(base, entry, core=entry["core"], advance=entry["advance"])


class IncreLoRAAllocator(triadapt.RankAllocator):
    """triadapt.RankAllocator with IncreLoRA's switches: sensitivity importance, block warmup, advance blocks.

    importance="sensitivity" scores every matrix by its smoothed sensitivity times its uncertainty,

        I_bar <- b1 I_bar + (1 - b1) I,   U_bar <- b2 U_bar + (1 - b2) |I - I_bar|,   score = I_bar U_bar,

    measured every step from I = sum |dW * dL/ddW| / sqrt(d_out d_in) (dL/ddW summed over micro-steps and,
    through `reduce`, over processes before the abs). block_warmup = N moves a block born at t0 by
    min(1, (t - t0) / N) of its update at step t. `optimizer`, if given, has the Adam moments of a block
    that goes live or is refilled set to zero (the advance block trained ahead with its own).
    """

    def __init__(self, layers, total_steps, importance="frobenius", betas=(0.85, 0.85), block_warmup=0,
                 reduce=None, optimizer=None, **kwargs):
        if importance not in IMPORTANCES:
            raise ValueError(f"unknown importance {importance!r}: choose one of {', '.join(IMPORTANCES)}")
        super().__init__(layers, total_steps, optimizer=optimizer, **kwargs)
        self.importance_kind, self.betas, self.block_warmup = importance, betas, block_warmup
        self.reduce = reduce
        for layer in self.layers.values():
            layer.track_sensitivity = importance == "sensitivity"
        device = next(iter(self.layers.values())).A.device
        self.I_bar = torch.zeros(len(self.layers), device=device)  # (n_layers,) sensitivity averages
        self.U_bar = torch.zeros(len(self.layers), device=device)  # (n_layers,) uncertainty averages
        self.young = []  # [(name, lo, hi, born t0, values before this step)]: blocks still in their warmup
        self.drop_spent_advance()

    def update_and_allocate(self, t):
        self.warm_up_blocks(t)
        if self.importance_kind == "sensitivity" and self.total_rank < self.target_total_rank:
            self.observe()
        grown = super().update_and_allocate(t)
        self.drop_spent_advance()
        self.remember_young(t)
        return grown

    def importance(self):
        if self.importance_kind == "frobenius":
            return super().importance()
        return self.sync(dict(zip(self.layers, (self.I_bar * self.U_bar).tolist())))

    @torch.no_grad()
    def observe(self):
        if self.reduce is not None:  # several processes: each has dL/ddW of its share of the batch
            self.reduce([l.grad_dW for l in self.layers.values() if l.grad_dW is not None])
        I = torch.stack([l.take_sensitivity() for l in self.layers.values()])  # (n_layers,)
        b1, b2 = self.betas
        self.I_bar.mul_(b1).add_((1 - b1) * I)
        self.U_bar.mul_(b2).add_((1 - b2) * (I - self.I_bar).abs())

    def block_slices(self, name, lo, hi):
        """Where block lo:hi lives: rows of A and L (P_j), columns of B and U (Q_j)."""
        layer, cols = self.layers[name], (slice(None), slice(lo, hi))
        return [(layer.A, slice(lo, hi)), (layer.B, cols), (layer.L, slice(lo, hi)), (layer.U, cols)]

    @torch.no_grad()
    def remember_young(self, t):
        """The values of the blocks that step t + 1 will still warm up, before that step moves them."""
        self.young = [(name, lo, hi, t0, [p[sl].clone() for p, sl in self.block_slices(name, lo, hi)])
                      for name, lo, hi, t0, _ in self.young if t + 1 - t0 < self.block_warmup]

    @torch.no_grad()
    def warm_up_blocks(self, t):
        for name, lo, hi, t0, before in self.young:
            f = min(1.0, (t - t0) / self.block_warmup)
            for (p, sl), b in zip(self.block_slices(name, lo, hi), before):
                p[sl] = b + f * (p[sl] - b)  # the update at lr(t) f instead of lr(t)

    def grow(self, t, name, k):
        layer = self.layers[name]
        lo, a = layer.rank, layer.advance
        super().grow(t, name, k)  # moves the optimizer's state into re-created tensors, if any
        if a:  # the block that went live and the refilled one start with zero moments
            self.zero_moments(layer.A, layer.B, lo, layer.rank + layer.advance)
        if self.block_warmup:
            self.young.append((name, lo, layer.rank, t, None))

    @torch.no_grad()
    def zero_moments(self, A, B, lo, hi):
        """Adam's exp_avg and exp_avg_sq of A's rows and B's columns lo:hi back to zero."""
        for p, sl in ((A, slice(lo, hi)), (B, (slice(None), slice(lo, hi)))):
            for v in (self.optimizer.state.get(p, {}) if self.optimizer is not None else {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v[sl] = 0

    def drop_spent_advance(self):
        """Advance blocks go once no growth is left for them (budget spent, or at the cap), and sensitivity
        is no longer measured once the budget is spent (it decides nothing any more)."""
        spent_all = self.total_rank >= self.target_total_rank
        for name, layer in self.layers.items():
            if spent_all:
                layer.track_sensitivity, layer.grad_dW, layer._dW = False, None, None
            if layer.advance and (spent_all or layer.rank >= self.caps[name]):
                self.zero_moments(layer.A, layer.B, layer.rank, layer.rank + layer.advance)
                layer.drop_advance()

    def state_dict(self):
        young = [(n, lo, hi, t0, [b.cpu() for b in before]) for n, lo, hi, t0, before in self.young]
        return {**super().state_dict(), "I_bar": self.I_bar.tolist(), "U_bar": self.U_bar.tolist(),
                "young": young}  # float32 -> float -> float32 is exact

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.drop_spent_advance()
        self.I_bar.copy_(torch.tensor(state["I_bar"]))
        self.U_bar.copy_(torch.tensor(state["U_bar"]))
        device = self.I_bar.device
        self.young = [(n, lo, hi, t0, [b.to(device) for b in before]) for n, lo, hi, t0, before in state["young"]]



