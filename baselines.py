"""
Baselines from the paper's comparison, written from scratch in the style of triadapt.py: AdaLoRA here,
IncreLoRA in triadapt.py (TriAdaptLoRA's allocator with a diagonal core and sensitivity importance).

AdaLoRA (Zhang et al., 2023) adapts a frozen linear layer y = x W^T + b (W is d_out x d_in) in an
SVD-like form whose triplets (A[i], E[i], B[:, i]) are pruned during training to a total-rank budget:

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
The loss adds lambda * R_orth on A and B (triadapt.orthogonal_penalty reads layer.A and layer.B).

Choices where the paper and PEFT are ambiguous or differ:
  - U_bar uses the I_bar of this step (the paper's equations and PEFT's RankAllocator do the same);
  - I_bar, U_bar are updated every step, warmups included, so scores are warm at the first masking;
  - the budget is an integer computed exactly (floor of a rational, no float noise), as PEFT's int();
  - exactly b(t) triplets stay live: ties are broken by layer order, then index (PEFT's threshold
    E <= kthvalue masks every tied entry and can leave fewer);
  - t_e = min(max(t_i, T - t_f), T - 1) and t_i = min(init_warmup, t_e): step T at the latest fixes
    the final mask, so every run ends with R_T live triplets, even one shorter than its warmups;
  - s = alpha / r_ref is constant (PEFT divides by the initial rank, which is constant too);
  - the moving averages are lerps (I_bar + (1 - b1) (I - I_bar)): one fused op for all tensors, equal
    to the equation up to rounding.

Parameters: r (d_in + d_out + 1) train all along, since masked triplets train too (n_held);
live * (d_in + d_out + 1) make up the final adapter (n_trainable).

Usage, with `layers = triadapt.inject(model, targets, layer_cls=AdaLoRALinear, rank=12, ref_rank=8)`:

    allocator = AdaLoRAAllocator(layers, total_steps=T, init_warmup=100, interval=10)
    for t in range(1, T + 1):
        loss = model(x, y) + lam * orthogonal_penalty(layers); loss.backward()
        clip_grad_norm_(params, 1.0); optimizer.step()
        allocator.step(t, optimizer)   # before zero_grad(): it reads p.grad; no tensor is replaced
        optimizer.zero_grad()

`python -m pytest tests/test_baselines.py` checks the math against values computed by hand.
"""
import torch
import torch.nn as nn

import triadapt


# ----------------------------------------------------------------------------- AdaLoRA

class AdaLoRALinear(nn.Module):
    """A frozen nn.Linear plus AdaLoRA's adapter s * B @ diag(E) @ A; `live` marks the kept triplets."""

    def __init__(self, base: nn.Linear, rank, alpha=16.0, ref_rank=8, init_std=0.02):
        super().__init__()
        if rank < 1 or rank > min(base.in_features, base.out_features):
            raise ValueError(f"rank must be in [1, {min(base.in_features, base.out_features)}], got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / ref_rank
        self.ref_rank = ref_rank
        self.init_std = init_std
        w = base.weight
        d_out, d_in = w.shape
        kw = dict(device=w.device, dtype=w.dtype)
        self.A = nn.Parameter(torch.randn(rank, d_in, **kw) * init_std)   # (r, d_in)
        self.B = nn.Parameter(torch.randn(d_out, rank, **kw) * init_std)  # (d_out, r)
        self.E = nn.Parameter(torch.zeros(rank, **kw))                    # (r,)
        # persistent: a resumed run must mask the same triplets in its final phase
        self.register_buffer("live", torch.ones(rank, dtype=torch.bool, device=w.device))  # (r,)
        self._live_count = rank  # a host copy of live.sum(), so that reading `rank` never syncs
        self.merged = False

    @property
    def rank(self):
        """The number of live triplets."""
        return self._live_count

    @property
    def n_trainable(self):
        """live * (d_in + d_out + 1): what the adapter holds at the end."""
        return self.rank * (self.base.in_features + self.base.out_features + 1)

    @property
    def n_held(self):
        """r * (d_in + d_out + 1): what trains, since masked triplets keep training and may revive."""
        return self.A.shape[0] * (self.base.in_features + self.base.out_features + 1)

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
        h = (x @ self.A.t()) * self.E               # (..., r)
        return y + h @ (self.scale * self.B).t()    # (..., d_out), s on the small factor

    # W <- W + dW and back, exactly as TriAdaptLinear does it (they need only base, merged, delta_weight)
    merge = triadapt.TriAdaptLinear.merge
    unmerge = triadapt.TriAdaptLinear.unmerge

    def extra_repr(self):
        return (f"d_in={self.base.in_features}, d_out={self.base.out_features}, "
                f"r={self.A.shape[0]}, live={self.rank}, s={self.scale:g}")

    def adapter_entry(self):
        """This layer in triadapt.adapter_state()'s output; load_adalora() rebuilds it."""
        return {"kind": "adalora", "alpha": self.scale * self.ref_rank, "ref_rank": self.ref_rank,
                "A": self.A, "B": self.B, "E": self.E, "live": self.live}


def load_adalora(model, name, entry):
    """Wrap the linear `name` of `model` in an AdaLoRALinear holding adapter_entry()'s values."""
    (layer,) = triadapt.inject(model, [name], layer_cls=AdaLoRALinear, rank=len(entry["E"]),
                               alpha=entry["alpha"], ref_rank=entry["ref_rank"]).values()
    with torch.no_grad():
        for key in ("A", "B", "E"):
            getattr(layer, key).copy_(entry[key])
    layer.set_live(entry["live"].to(layer.live.device))
    return layer


class AdaLoRAAllocator:
    """Scores the triplets of AdaLoRALinear layers and masks them down to the cubic budget b(t).

    Called like triadapt.RankAllocator, step(t, optimizer) once per optimizer step t, but before
    zero_grad(), since it reads p.grad. The optimizer is never touched (no tensor changes shape).
    `sync`, if given, maps the dict {name: triplet scores (r,)} of a masking step to the dict used
    (e.g. rank 0's values broadcast to every process, so all keep the same triplets).
    """

    def __init__(self, layers, total_steps, target_total_rank=None, init_warmup=0, final_warmup=None,
                 interval=1, beta1=0.85, beta2=0.85, sync=None):
        if not layers:
            raise ValueError("AdaLoRAAllocator needs at least one layer")
        self.layers = dict(layers)
        ref_rank = next(iter(self.layers.values())).ref_rank
        self.total_steps, self.interval = total_steps, max(1, interval)
        self.init_warmup = init_warmup                                                  # as given
        self.final_warmup = total_steps // 6 if final_warmup is None else final_warmup  # t_f
        # step T at the latest fixes the final mask, so every run ends with R_T live triplets
        self.mask_end = min(max(init_warmup, total_steps - self.final_warmup), total_steps - 1)  # t_e
        self.mask_start = min(init_warmup, self.mask_end)                                        # t_i
        self.initial_total_rank = sum(l.A.shape[0] for l in self.layers.values())     # R_0
        self.target_total_rank = target_total_rank or ref_rank * len(self.layers)      # R_T
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
        self.scores = {}  # {name: triplet scores (r,)} of the last masking, on the CPU, for reports
        self.events = []  # (t, name, live count) whenever a layer's live count changes

    @property
    def total_rank(self):
        return sum(l.rank for l in self.layers.values())

    def rank_pattern(self):
        return {n: l.rank for n, l in self.layers.items()}

    def max_held(self):
        """The adapter parameters that train at any time: every triplet, masked or not."""
        return sum(l.n_held for l in self.layers.values())

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
            raise RuntimeError(f"no gradient for {', '.join(missing)}: call AdaLoRAAllocator.step(t) after "
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

    def step(self, t, optimizer=None):
        """Call right after optimizer step t (t counts from 1), before zero_grad(). Returns the names whose
        live count changed; the optimizer is unused (kept for RankAllocator's protocol)."""
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
    def load_state_dict(self, state, optimizer=None):
        """Restore the moving averages and the phase; the optimizer is unused (RankAllocator's protocol)."""
        keys = [f"{n}.{key}" for n, key, _ in self.params]
        for name, mine in (("I_bar", self.I_bar), ("U_bar", self.U_bar)):
            for k, v in zip(keys, mine):
                v.copy_(state[name][k])
        self.final_mask_set = bool(state["final_mask_set"])
        self.scores = dict(state["scores"])
        self.events = [tuple(e) for e in state["events"]]


# ----------------------------------------------------------------------------- IncreLoRA
# IncreLoRA is TriAdaptLoRA's RankAllocator with a diagonal core and sensitivity importance: see triadapt.py.
