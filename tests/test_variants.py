"""The growth variants of triadapt.py, on tiny hand-checkable cases: the diagonal core (IncreLoRA's),
sensitivity importance, block warmup and advance learning."""

import pytest
import torch
import torch.nn as nn

import triadapt
from triadapt import RankAllocator, TriAdaptLinear


def linear(d_in, d_out, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


# ----------------------------------------------------------------------------- diagonal core

def test_diagonal_core_counts_and_grows_without_changing_dW():
    layer = TriAdaptLinear(linear(16, 16), rank=1, core="diagonal")
    with torch.no_grad():
        layer.B.normal_()
    for k in (4, 4):
        before = layer.delta_weight()
        layer.grow(k)
        assert torch.equal(layer.delta_weight(), before)
    assert layer.block_sizes == [1, 4, 4]
    assert layer.n_trainable == 9 * (16 + 16) + 9  # r (d_in + d_out) + r: one lambda per rank
    assert torch.equal(layer.core(), torch.eye(9))
    # after a step on every entry the core stays diagonal: the masks give the rest no gradient
    layer.core().sum().backward()
    assert torch.equal(layer.L.grad, torch.eye(9)) and torch.count_nonzero(layer.U.grad) == 0


# ----------------------------------------------------------------------------- sensitivity importance

def sensitivity_layer():
    """d_in = d_out = 2, r = 1, s = 1: A = [1 2], B = [3 4]^T, C = 1, so dW = [[3, 6], [4, 8]]."""
    base = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(base.weight)
    layer = TriAdaptLinear(base, rank=1, alpha=1.0, ref_rank=1)
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0, 2.0]]))
        layer.B.copy_(torch.tensor([[3.0], [4.0]]))
    return layer


def test_sensitivity_is_the_sum_of_dW_times_its_gradient_over_sqrt_numel():
    layer = sensitivity_layer()
    allocator = RankAllocator({"l": layer}, total_steps=100, target_total_rank=2, warmup=50,
                              importance="sensitivity")
    x = torch.tensor([[1.0, 1.0]])
    y = layer(x)  # (1, 2) = x dW^T = [9, 12]
    assert torch.equal(y, torch.tensor([[9.0, 12.0]]))
    # loss = y . [1, -1]: dL/ddW = [[1, 1], [-1, -1]], |dW * that| sums to 3 + 6 + 4 + 8 = 21, / sqrt(4)
    (y * torch.tensor([1.0, -1.0])).sum().backward()
    assert torch.equal(layer.grad_dW, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    allocator.before_step(1)
    assert layer.grad_dW is None  # taken once a step
    allocator.step(1, torch.optim.SGD(layer.parameters(), lr=0.0))
    # I = 10.5: I_bar = 0.15 * 10.5; U_bar = 0.15 * |10.5 - 1.575|
    assert allocator.I_bar.item() == pytest.approx(1.575) and allocator.U_bar.item() == pytest.approx(1.33875)
    (layer(x) * torch.tensor([1.0, -1.0])).sum().backward()
    allocator.before_step(2)
    allocator.step(2, torch.optim.SGD(layer.parameters(), lr=0.0))
    # I_bar = 0.85 * 1.575 + 1.575 = 2.91375; U_bar = 0.85 * 1.33875 + 0.15 * |10.5 - 2.91375| = 2.275875
    assert allocator.I_bar.item() == pytest.approx(2.91375) and allocator.U_bar.item() == pytest.approx(2.275875)


def test_sensitivity_is_the_whole_batchs_under_micro_steps():
    # |dW * G| of the summed gradient, not the sum of each micro-step's |dW * G_m|: the same score
    # for one batch as for two halves, each weighted by its share (as train.py's --grad-accum does)
    torch.manual_seed(0)
    x, target = torch.randn(8, 2), torch.randn(8, 2)
    scores = []
    for halves in (1, 2):
        layer = sensitivity_layer()
        allocator = RankAllocator({"l": layer}, total_steps=100, target_total_rank=2, warmup=50,
                                  importance="sensitivity")
        for xm, tm in zip(x.chunk(halves), target.chunk(halves)):
            ((layer(xm) - tm) ** 2).mean().div(halves).backward()
        allocator.before_step(1)
        allocator.step(1, torch.optim.SGD(layer.parameters(), lr=0.0))
        scores.append(allocator.I_bar.item())
    assert scores[0] == pytest.approx(scores[1], rel=1e-6) and scores[0] > 0


def test_sensitivity_rounds_grow_the_top_k_matrices():
    layers = {n: TriAdaptLinear(linear(4, 4, i), rank=1, ref_rank=2) for i, n in enumerate("abc")}
    allocator = RankAllocator(layers, total_steps=10, schedule="topk", top_k=2, rank_step=1, warmup=0,
                              importance="sensitivity", betas=(0.5, 0.5))
    for layer, value in zip(layers.values(), (1.0, 3.0, 2.0)):
        layer.take_sensitivity = lambda value=value: torch.tensor(value)
    allocator.before_step(1)
    # one step: I_bar = I / 2, U_bar = |I - I / 2| / 2, so score = I^2 / 8: 0.125, 1.125, 0.5
    grown = allocator.step(1, torch.optim.SGD([p for l in layers.values() for p in l.parameters()], lr=0.1))
    assert grown == ["b", "c"] and allocator.scores == pytest.approx({"a": 0.125, "b": 1.125, "c": 0.5})
    assert allocator.rank_pattern() == {"a": 1, "b": 2, "c": 2}


# ----------------------------------------------------------------------------- block warmup

def test_block_warmup_scales_a_new_blocks_learning_rate():
    layer = TriAdaptLinear(linear(4, 4), rank=1, ref_rank=2)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    allocator = RankAllocator({"l": layer}, total_steps=10, schedule="topk", rank_step=1, block_warmup=4)

    def step(t):
        for p in layer.parameters(recurse=False):
            p.grad = torch.ones_like(p)
        allocator.before_step(t)
        before = {n: p.detach().clone() for n, p in layer.named_parameters(recurse=False)}
        opt.step()
        grown = allocator.step(t, opt)
        return before, grown

    _, grown = step(1)  # the round after step 1 adds block 1 (rows/columns 1:2), born at t0 = 1
    assert grown == ["l"] and layer.block_sizes == [1, 1]
    for t in (2, 3, 5, 6):
        before, _ = step(t)
        f = min(1.0, (t - 1) / 4)  # lr(t) * min(1, (t - t0) / N), lr = 1
        A, B, L, U = (p.detach() for p in (layer.A, layer.B, layer.L, layer.U))
        a, b, l, u = (before[n] for n in "ABLU")
        assert torch.allclose(A[1:] - a[1:], torch.full_like(a[1:], -f))   # the new block's row of A
        assert torch.allclose(B[:, 1:] - b[:, 1:], torch.full_like(b[:, 1:], -f))
        assert torch.allclose(L[1:] - l[1:], torch.full_like(l[1:], -f))   # its row block P_1
        assert torch.allclose(U[:, 1:] - u[:, 1:], torch.full_like(u[:, 1:], -f))  # its column block Q_1
        assert torch.allclose(A[:1] - a[:1], torch.full_like(a[:1], -1.0))  # block 0 at the full rate
        assert torch.allclose(L[:1, :1] - l[:1, :1], torch.full_like(l[:1, :1], -1.0))


# ----------------------------------------------------------------------------- advance learning

def test_advance_block_trains_ahead_and_goes_live_without_changing_dW():
    torch.manual_seed(0)
    layer = TriAdaptLinear(linear(8, 6), rank=1, ref_rank=4, advance=2)
    assert layer.n_trainable == (1 + 2) * (8 + 6) + 2  # the advance block is held and counted
    x = torch.randn(5, 8)
    layer(x).pow(2).sum().backward()
    # B_next gets a gradient at once (eps-sized: A_next's rows times the frozen eps), A_next not yet (B_next = 0)
    assert layer.B_next.grad.abs().sum() > 0 and layer.A_next.grad.abs().sum() == 0
    with torch.no_grad():  # as if trained ahead for a while
        layer.B_next.normal_()
        layer.B.normal_()
    A_next, B_next = layer.A_next.detach().clone(), layer.B_next.detach().clone()
    before, y = layer.delta_weight(), layer(x)
    layer.grow(2)
    assert torch.allclose(layer.delta_weight(), before, atol=1e-7) and torch.allclose(layer(x), y, atol=1e-6)
    assert torch.equal(layer.A[1:], A_next) and torch.equal(layer.B[:, 1:], B_next)  # the trained values
    assert torch.equal(layer.core()[1:, 1:], triadapt.ADVANCE_EPS * torch.eye(2))      # the frozen eps, now live
    assert torch.count_nonzero(layer.B_next) == 0 and layer.A_next.shape == (2, 8)     # a fresh next block
    layer.drop_advance()
    assert layer.n_trainable == 3 * (8 + 6) + 2 * (1 * 1 + 2 * 3) and not hasattr(layer, "A_next")


def test_the_allocator_drops_advance_blocks_once_the_budget_is_spent():
    layers = {n: TriAdaptLinear(linear(4, 4, i), rank=1, ref_rank=2, advance=1) for i, n in enumerate("ab")}
    opt = torch.optim.AdamW([p for l in layers.values() for p in l.parameters(recurse=False)], lr=0.1)
    allocator = RankAllocator(layers, total_steps=10, schedule="topk", top_k=1, rank_step=1)
    held = len(opt.param_groups[0]["params"])
    assert held == 2 * 6  # A, B, L, U, A_next, B_next per layer
    for t in (1, 2):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
        allocator.step(t, opt)
    assert allocator.total_rank == 4 and all(l.advance == 0 for l in layers.values())
    assert len(opt.param_groups[0]["params"]) == 2 * 4 and len(opt.state) == 2 * 4
    ids = {id(p) for l in layers.values() for p in l.parameters(recurse=False)}
    assert {id(p) for p in opt.param_groups[0]["params"]} == ids


def test_adapter_state_round_trips_the_variants():
    torch.manual_seed(0)
    for kw in (dict(core="diagonal"), dict(advance=2)):
        model = nn.Sequential(nn.Linear(8, 8))
        (layer,) = triadapt.inject(model, ["0"], rank=1, ref_rank=4, **kw).values()
        layer.grow(2)
        with torch.no_grad():
            for p in layer.parameters(recurse=False):
                p.add_(torch.randn_like(p))
        state = triadapt.adapter_state({"0": layer})
        fresh = nn.Sequential(nn.Linear(8, 8))
        fresh.load_state_dict({"0.weight": layer.base.weight, "0.bias": layer.base.bias})
        (loaded,) = triadapt.load_adapter(fresh, state, ref_rank=4).values()
        x = torch.randn(3, 8)
        assert torch.equal(loaded(x), layer(x)) and loaded.core_kind == layer.core_kind


def test_a_growth_smaller_than_the_advance_block_keeps_the_rest_of_it():
    torch.manual_seed(0)
    layer = TriAdaptLinear(linear(8, 6), rank=1, ref_rank=4, advance=3)
    with torch.no_grad():
        layer.B_next.normal_()
    A_next, B_next = layer.A_next.detach().clone(), layer.B_next.detach().clone()
    before = layer.delta_weight()
    layer.grow(1)  # takes one row of the advance block; the other two stay in it, trained
    assert torch.allclose(layer.delta_weight(), before, atol=1e-7)
    assert torch.equal(layer.A_next[:2], A_next[1:]) and torch.equal(layer.B_next[:, :2], B_next[:, 1:])
    assert torch.count_nonzero(layer.B_next[:, 2:]) == 0


@pytest.mark.parametrize("core", ["triangular", "diagonal"])
def test_every_factor_of_an_increlora_style_layer_trains_within_two_steps(core):
    torch.manual_seed(0)
    layer = TriAdaptLinear(linear(8, 6), rank=2, ref_rank=4, core=core, advance=2)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 8)
    got = {}
    for _ in range(2):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        for n, p in layer.named_parameters(recurse=False):
            masked = p.grad * (layer.L_mask if n == "L" else layer.U_mask if n == "U" else 1)
            got[n] = got.get(n, False) or bool(masked.abs().sum() > 0)
        opt.step()
    expected = {"A", "B", "L", "A_next", "B_next"} | ({"U"} if core == "triangular" else set())
    assert {n for n, g in got.items() if g} == expected
