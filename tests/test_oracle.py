"""The oracle: a literal, slow TriAdaptLoRA written from the method's equations, checked against triadapt.py.

Here every block j of a matrix is its own four tensors, P_j (k_j x R_j), Q_j (R_j x k_j), A_j (k_j x d_in)
and B_j (d_out x k_j), and every call assembles C = L + U, A and B from them (no capacity, no masks):

    L = [P_0 | 0; P_1 | 0; ...],  U = [Q_0 | Q_1 | ...] (each padded with zeros below),  C = L + U
    dW = s B C A,   y = x W^T + b + x dW^T,   N(C) = ||C||_F / r
    R_orth = 1/(2n) sum_l (||A_l A_l^T - I||_F + ||B_l^T B_l - I||_F)

and the allocator round is the spec, written out: after step t, when t > warmup, t % interval == 0 and
R_total < R_target, score = N(C now) - N(C at the previous round); p = (t - warmup) / (T - warmup) clipped
to [0, 1]; K = floor(D p) (linear), floor(D ** p) (exponential) or top_k, computed exactly, clamped to
[1, E] (E the matrices below their cap); tau = the K-th largest score among those; every one scoring
>= tau grows, in descending score order (ties in layer order), by min(k, D left, cap - r). A new block
is A rows torch.randn(k, d_in, dtype=float64) * init_std from the global generator (the oracle is
float64 only), B columns 0, P = [0 | I], Q = 0.

triadapt.py's fixed-capacity, masked, in-place storage must give the same numbers: the same loss at
every step of a short float64 fine-tune (1e-9), the same growth events, and the same outputs and
gradients at random parameters after every growth.
"""
import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import triadapt

F64 = torch.float64


# ----------------------------------------------------------------------------- the oracle

class OracleLinear(nn.Module):
    """A frozen nn.Linear plus s * B @ (L + U) @ A, with per-block tensors assembled on every call."""

    def __init__(self, base, alpha, ref_rank, init_std):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.s, self.init_std = alpha / ref_rank, init_std
        self.cap = min(base.in_features, base.out_features)
        self.P, self.Q, self.A, self.B = [], [], [], []  # block j: P[j], Q[j], A[j], B[j]

    @property
    def rank(self):
        return sum(a.shape[0] for a in self.A)

    def grow(self, k):
        R_prev, d_out, d_in = self.rank, *self.base.weight.shape
        R = R_prev + k
        self.A.append((torch.randn(k, d_in, dtype=F64) * self.init_std).requires_grad_())
        self.B.append(torch.zeros(d_out, k, dtype=F64, requires_grad=True))
        self.P.append(torch.cat([torch.zeros(k, R_prev, dtype=F64), torch.eye(k, dtype=F64)], 1).requires_grad_())
        self.Q.append(torch.zeros(R, k, dtype=F64, requires_grad=True))

    def tensors(self):
        return self.A + self.B + self.P + self.Q

    def core(self):
        r = self.rank
        L = torch.cat([F.pad(P, (0, r - P.shape[1])) for P in self.P], dim=0)        # (r, r)
        U = torch.cat([F.pad(Q, (0, 0, 0, r - Q.shape[0])) for Q in self.Q], dim=1)  # (r, r)
        return L + U

    def factors(self):
        return torch.cat(self.A, dim=0), torch.cat(self.B, dim=1)  # (r, d_in), (d_out, r)

    def delta_weight(self):
        A, B = self.factors()
        return self.s * B @ self.core() @ A

    def forward(self, x):
        return self.base(x) + x @ self.delta_weight().t()


def oracle_norm(C):
    return (torch.linalg.norm(C) / C.shape[0]).item()  # N(C) = ||C||_F / r


def oracle_orth(layers):
    total = 0.0
    for layer in layers:
        A, B = layer.factors()
        I = torch.eye(layer.rank, dtype=F64)
        total = total + torch.linalg.norm(A @ A.t() - I) + torch.linalg.norm(B.t() @ B - I)
    return total / (2 * len(layers))


def exact_floor_power(D, p):
    """floor(D ** p) for a rational p = a / b, exactly: the largest K with K^b <= D^a."""
    K = math.floor(D ** float(p))
    while K > 0 and K ** p.denominator > D ** p.numerator:
        K -= 1
    while (K + 1) ** p.denominator <= D ** p.numerator:
        K += 1
    return K


class OracleAllocator:
    def __init__(self, layers, T, R_target, schedule, warmup, interval, k, top_k=1):
        self.layers, self.T, self.R_target, self.schedule = layers, T, R_target, schedule
        self.warmup, self.interval, self.k, self.top_k = warmup, interval, k, top_k
        self.prev = {n: oracle_norm(l.core()) for n, l in layers.items()}
        self.events = []

    def total(self):
        return sum(l.rank for l in self.layers.values())

    def after_step(self, t):
        if not (t > self.warmup and t % self.interval == 0 and self.total() < self.R_target):
            return []
        now = {n: oracle_norm(l.core()) for n, l in self.layers.items()}
        score = {n: now[n] - self.prev[n] for n in now}
        self.prev = now
        E = [n for n, l in self.layers.items() if l.rank < l.cap]
        if not E:
            return []
        p = min(max(Fraction(t - self.warmup, self.T - self.warmup), Fraction(0)), Fraction(1))
        D = self.R_target - self.total()
        K = {"linear": lambda: math.floor(D * p), "exponential": lambda: exact_floor_power(D, p),
             "topk": lambda: self.top_k}[self.schedule]()
        K = min(max(K, 1), len(E))
        tau = sorted((score[n] for n in E), reverse=True)[K - 1]
        grown = []
        for n in sorted((n for n in E if score[n] >= tau), key=lambda n: -score[n]):
            layer = self.layers[n]
            k = min(self.k, self.R_target - self.total(), layer.cap - layer.rank)
            if k == 0:
                break
            layer.grow(k)
            self.events.append((t, n, k))
            grown.append(n)
        return grown


# ----------------------------------------------------------------------------- fast vs oracle, one state

def oracle_of(layer):
    """An OracleLinear holding copies of a TriAdaptLinear's blocks (its active values only)."""
    oracle = OracleLinear(copy.deepcopy(layer.base), alpha=layer.scale * layer.ref_rank,
                          ref_rank=layer.ref_rank, init_std=layer.init_std)
    for lo, hi in layer.blocks():
        for store, value in ((oracle.P, layer.L[lo:hi, :hi]), (oracle.Q, layer.U[:hi, lo:hi]),
                             (oracle.A, layer.A[lo:hi]), (oracle.B, layer.B[:, lo:hi])):
            store.append(value.detach().clone().requires_grad_())
    return oracle


def randomize(layer, g):
    """Random values on what trains (A[:r], B[:, :r], the blocks' entries of L and U), 0 elsewhere."""
    r = layer.rank
    with torch.no_grad():
        for p, mask in ((layer.A, torch.arange(layer.capacity)[:, None] < r),
                        (layer.B, torch.arange(layer.capacity)[None, :] < r),
                        (layer.L, layer.L_mask != 0), (layer.U, layer.U_mask != 0)):
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * mask)


def check_against_oracle(model, names, seed):
    """At random parameters (on a copy of `model`; no draw from the global generator): the same output,
    R_orth, N(C) and gradients of every A_j, B_j, P_j, Q_j as the oracle holding those values."""
    g = torch.Generator().manual_seed(seed)
    fast_model = copy.deepcopy(model)
    fast = {n: fast_model.get_submodule(n) for n in names}
    for layer in fast.values():
        randomize(layer, g)
    oracle_model = copy.deepcopy(fast_model)
    oracle = {n: oracle_of(layer) for n, layer in fast.items()}
    for n, layer in oracle.items():
        setattr(oracle_model, n, layer)
    x = torch.randn(5, fast_model[0].base.in_features, generator=g, dtype=F64)
    w = torch.randn(5, fast_model[-1].base.out_features, generator=g, dtype=F64)
    y_fast, y_oracle = fast_model(x), oracle_model(x)
    assert torch.allclose(y_fast, y_oracle, rtol=0, atol=1e-10)
    orth_fast, orth_oracle = triadapt.orthogonal_penalty(fast), oracle_orth(list(oracle.values()))
    assert orth_fast.item() == pytest.approx(orth_oracle.item(), rel=1e-12)
    for n in names:
        assert torch.allclose(fast[n].core(), oracle[n].core(), rtol=0, atol=0)
        assert triadapt.normalized_frobenius(fast[n].core()) == pytest.approx(oracle_norm(oracle[n].core()), rel=1e-6)
    ((y_fast * w).sum() + 0.1 * orth_fast).backward()
    ((y_oracle * w).sum() + 0.1 * orth_oracle).backward()
    for n in names:
        f, o = fast[n], oracle[n]
        grads = {"A": torch.zeros_like(f.A), "B": torch.zeros_like(f.B), "L": torch.zeros_like(f.L),
                 "U": torch.zeros_like(f.U)}
        for j, (lo, hi) in enumerate(f.blocks()):
            assert torch.allclose(f.A.grad[lo:hi], o.A[j].grad, rtol=1e-9, atol=1e-12), (n, j, "A")
            assert torch.allclose(f.B.grad[:, lo:hi], o.B[j].grad, rtol=1e-9, atol=1e-12), (n, j, "B")
            assert torch.allclose(f.L.grad[lo:hi, :hi], o.P[j].grad, rtol=1e-9, atol=1e-12), (n, j, "P")
            assert torch.allclose(f.U.grad[:hi, lo:hi], o.Q[j].grad, rtol=1e-9, atol=1e-12), (n, j, "Q")
            grads["A"][lo:hi], grads["B"][:, lo:hi] = f.A.grad[lo:hi], f.B.grad[:, lo:hi]
            grads["L"][lo:hi, :hi], grads["U"][:hi, lo:hi] = f.L.grad[lo:hi, :hi], f.U.grad[:hi, lo:hi]
        for key, expected in grads.items():  # and nothing outside the blocks gets a gradient
            assert torch.equal(getattr(f, key).grad, expected), (n, key)


def test_forward_and_gradients_match_the_oracle_after_every_growth():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 5)).double()
    layers = triadapt.inject(model, ["0", "2"], rank=2, alpha=6.0, ref_rank=2)  # capacity 4
    check_against_oracle(model, ["0", "2"], seed=0)
    x = torch.randn(3, 9, dtype=F64)
    for i, (name, k) in enumerate([("0", 1), ("2", 2), ("0", 3), ("2", 1), ("0", 1)]):  # "0": 4 -> 7, "2": 4 -> 5
        with torch.no_grad():  # what training could have reached, so that the growth has something to keep
            randomize(layers[name], torch.Generator().manual_seed(100 + i))
            before = model(x)
        layers[name].grow(k)
        with torch.no_grad():
            assert torch.allclose(model(x), before, rtol=0, atol=1e-12)  # a growth keeps the function
        check_against_oracle(model, ["0", "2"], seed=i + 1)
    assert [l.block_sizes for l in layers.values()] == [[2, 1, 3, 1], [2, 2, 1]]
    assert [l.capacity for l in layers.values()] == [7, 5]  # both doubled, clipped to min(d_in, d_out)


# ----------------------------------------------------------------------------- fast vs oracle, a fine-tune

NAMES = ["0", "2", "4"]
T, WARMUP, INTERVAL, R_TARGET, LR = 40, 4, 3, 13, 0.5


def fine_tune(impl, schedule, check=False):
    """Plain SGD on MSE + 0.1 R_orth, float64, fixed data; returns (losses, events, ranks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    kw = dict(alpha=4.0, ref_rank=2, init_std=0.3)  # s = 2, capacity 4
    if impl == "fast":
        layers = triadapt.inject(model, NAMES, rank=1, **kw)
        allocator = triadapt.RankAllocator(layers, total_steps=T, target_total_rank=R_TARGET, schedule=schedule,
                                           warmup=WARMUP, interval=INTERVAL, rank_step=1)
        params = lambda: [p for p in model.parameters() if p.requires_grad]
        penalty = lambda: triadapt.orthogonal_penalty(layers)
        after_step = allocator.update_and_allocate
    else:
        model.requires_grad_(False)
        layers = {}
        for n in NAMES:  # in module order, as inject(): each draws its first block's A
            layers[n] = OracleLinear(model.get_submodule(n), **kw)
            layers[n].grow(1)
            setattr(model, n, layers[n])
        allocator = OracleAllocator(layers, T, R_TARGET, schedule, WARMUP, INTERVAL, k=1)
        params = lambda: [p for l in layers.values() for p in l.tensors()]
        penalty = lambda: oracle_orth(list(layers.values()))
        after_step = allocator.after_step
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=F64), torch.randn(32, 4, generator=g, dtype=F64)
    losses = []
    for t in range(1, T + 1):
        # SGD without momentum holds no state: one made every step is the same optimizer, and it follows
        # the oracle's new blocks and a capacity doubling's new tensors
        opt = torch.optim.SGD(params(), lr=LR)
        loss = F.mse_loss(model(x), y) + 0.1 * penalty()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step(t) and check:
            check_against_oracle(model, NAMES, seed=t)
        losses.append(loss.item())
    return losses, allocator.events, {n: l.rank for n, l in layers.items()}


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_a_fine_tune_matches_the_oracle_step_by_step(schedule):
    fast_losses, fast_events, fast_ranks = fine_tune("fast", schedule, check=True)
    oracle_losses, oracle_events, oracle_ranks = fine_tune("oracle", schedule)
    assert fast_events == oracle_events and fast_ranks == oracle_ranks
    assert len({t for t, _, _ in fast_events}) >= 5  # at least 5 growth rounds
    assert sum(fast_ranks.values()) == R_TARGET and max(fast_ranks.values()) > 4  # a capacity doubled
    for t, (a, b) in enumerate(zip(fast_losses, oracle_losses, strict=True), start=1):
        assert abs(a - b) <= 1e-9, (t, a, b)
    assert fast_losses[-1] < fast_losses[0]
