"""The growth variants of baselines.py, on tiny hand-checkable cases: the diagonal core (IncreLoRA's),
sensitivity importance, block warmup and advance learning (IncreLoRALinear, IncreLoRAAllocator), and the
trainable counts of every method."""

import pytest
import torch
import torch.nn as nn

import adapters
import triadapt
from baselines import ADVANCE_EPS, AdaLoRALinear, IncreLoRAAllocator, IncreLoRALinear, LoRALinear


def linear(d_in, d_out, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def trainable_masks(layer):
    """{name: 0/1 mask} of what trains in an IncreLoRALinear: A's rows and B's columns up to r + advance,
    and the blocks' entries of L and U."""
    n = layer.rank + layer.advance
    A, B = torch.zeros_like(layer.A), torch.zeros_like(layer.B)
    A[:n], B[:, :n] = 1, 1
    return {"A": A, "B": B, "L": (layer.L_mask != 0).to(A.dtype), "U": (layer.U_mask != 0).to(A.dtype)}


def assert_rest_is_zero(layer):
    for name, mask in trainable_masks(layer).items():
        assert torch.count_nonzero(getattr(layer, name) * (1 - mask)) == 0, name


def ranks(layers):
    """{name: rank} of a dict of adapter layers (an allocator's .layers, say)."""
    return {n: l.rank for n, l in layers.items()}


# ----------------------------------------------------------------------------- diagonal core

def test_diagonal_core_counts_and_grows_without_changing_dW():
    layer = IncreLoRALinear(linear(16, 16), rank=1, core="diagonal")  # s = 16 / 8 = 2, capacity 16
    with torch.no_grad():
        layer.B[:, :1].normal_()
    for k in (4, 4):
        before = layer.delta_weight()
        layer.grow(k)
        assert torch.equal(layer.delta_weight(), before)
    assert layer.block_sizes == [1, 4, 4]
    assert layer.n_trainable == 9 * (16 + 16) + 9  # r (d_in + d_out) + r: one lambda per rank
    assert torch.equal(layer.core(), torch.eye(9))
    # the core stays diagonal: the masks give every other entry of L (and all of U) no gradient
    layer.scaled_core().sum().backward()
    diag = torch.zeros(16, 16)
    diag[range(9), range(9)] = 2.0  # d(s C)/dL = s on the 9 diagonal entries
    assert torch.equal(layer.L.grad, diag) and torch.count_nonzero(layer.U.grad) == 0
    assert_rest_is_zero(layer)


# ----------------------------------------------------------------------------- sensitivity importance

def sensitivity_layer():
    """d_in = d_out = 2, r = 1, s = 1: A = [1 2], B = [3 4]^T, C = 1, so dW = [[3, 6], [4, 8]]."""
    base = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(base.weight)
    layer = IncreLoRALinear(base, rank=1, alpha=1.0, ref_rank=1)  # capacity 2: A (2, 2), B (2, 2)
    with torch.no_grad():
        layer.A[:1].copy_(torch.tensor([[1.0, 2.0]]))
        layer.B[:, :1].copy_(torch.tensor([[3.0], [4.0]]))
    return layer


def test_sensitivity_is_the_sum_of_dW_times_its_gradient_over_sqrt_numel():
    layer = sensitivity_layer()
    allocator = IncreLoRAAllocator({"l": layer}, total_steps=100, target_total_rank=2, warmup=50,
                                   importance="sensitivity")
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.0)
    x = torch.tensor([[1.0, 1.0]])
    y = layer(x)  # (1, 2) = x dW^T = [9, 12]
    assert torch.equal(y, torch.tensor([[9.0, 12.0]]))
    # loss = y . [1, -1]: dL/ddW = [[1, 1], [-1, -1]], |dW * that| sums to 3 + 6 + 4 + 8 = 21, / sqrt(4)
    (y * torch.tensor([1.0, -1.0])).sum().backward()
    assert torch.equal(layer.grad_dW, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    opt.step()
    assert allocator.update_and_allocate(1) == []  # t <= warmup: measured, no round
    assert layer.grad_dW is None  # taken once a step
    # I = 10.5: I_bar = 0.15 * 10.5; U_bar = 0.15 * |10.5 - 1.575|
    assert allocator.I_bar.item() == pytest.approx(1.575) and allocator.U_bar.item() == pytest.approx(1.33875)
    opt.zero_grad()
    (layer(x) * torch.tensor([1.0, -1.0])).sum().backward()
    opt.step()
    allocator.update_and_allocate(2)
    # I_bar = 0.85 * 1.575 + 1.575 = 2.91375; U_bar = 0.85 * 1.33875 + 0.15 * |10.5 - 2.91375| = 2.275875
    assert allocator.I_bar.item() == pytest.approx(2.91375) and allocator.U_bar.item() == pytest.approx(2.275875)


def test_sensitivity_reads_dW_as_of_the_backward_not_after_the_step():
    # the allocator runs after optimizer.step(): I must use the dW that produced the gradient
    layer = sensitivity_layer()
    allocator = IncreLoRAAllocator({"l": layer}, total_steps=100, target_total_rank=2, warmup=50,
                                   importance="sensitivity")
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    before = layer.delta_weight().detach().clone()
    (layer(torch.tensor([[1.0, 1.0]])) * torch.tensor([1.0, -1.0])).sum().backward()
    opt.step()
    assert not torch.equal(layer.delta_weight(), before)  # the step moved dW
    allocator.update_and_allocate(1)
    assert allocator.I_bar.item() == pytest.approx(0.15 * 10.5)  # I = 10.5, from the dW of the backward


def test_sensitivity_is_the_whole_batchs_under_micro_steps():
    # |dW * G| of the summed gradient, not the sum of each micro-step's |dW * G_m|: the same score
    # for one batch as for two halves, each weighted by its share (as train.py's --grad-accum does)
    torch.manual_seed(0)
    x, target = torch.randn(8, 2), torch.randn(8, 2)
    scores = []
    for halves in (1, 2):
        layer = sensitivity_layer()
        allocator = IncreLoRAAllocator({"l": layer}, total_steps=100, target_total_rank=2, warmup=50,
                                       importance="sensitivity")
        for xm, tm in zip(x.chunk(halves), target.chunk(halves)):
            ((layer(xm) - tm) ** 2).mean().div(halves).backward()
        torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.0).step()
        allocator.update_and_allocate(1)
        scores.append(allocator.I_bar.item())
    assert scores[0] == pytest.approx(scores[1], rel=1e-6) and scores[0] > 0


def test_sensitivity_rounds_grow_the_top_k_matrices():
    layers = {n: IncreLoRALinear(linear(4, 4, i), rank=1, ref_rank=2) for i, n in enumerate("abc")}
    allocator = IncreLoRAAllocator(layers, total_steps=10, schedule="topk", top_k=2, rank_step=1, warmup=0,
                                   importance="sensitivity", betas=(0.5, 0.5))
    for layer, value in zip(layers.values(), (1.0, 3.0, 2.0)):
        layer.take_sensitivity = lambda value=value: torch.tensor(value)
    # one step: I_bar = I / 2, U_bar = |I - I / 2| / 2, so score = I^2 / 8: 0.125, 1.125, 0.5
    grown = allocator.update_and_allocate(1)
    assert grown == ["b", "c"] and allocator.scores == pytest.approx({"a": 0.125, "b": 1.125, "c": 0.5})
    assert ranks(allocator.layers) == {"a": 1, "b": 2, "c": 2}
    assert allocator.events == [(1, "b", 1), (1, "c", 1)]


# ----------------------------------------------------------------------------- block warmup

def test_block_warmup_scales_a_new_blocks_learning_rate():
    layer = IncreLoRALinear(linear(4, 4), rank=1, ref_rank=2)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1.0)
    allocator = IncreLoRAAllocator({"l": layer}, total_steps=10, schedule="topk", rank_step=1, block_warmup=4)

    def step(t):
        for name, mask in trainable_masks(layer).items():  # a gradient of 1 on every entry that trains
            getattr(layer, name).grad = mask.clone()
        before = {n: p.detach().clone() for n, p in layer.named_parameters(recurse=False)}
        opt.step()
        grown = allocator.update_and_allocate(t)
        return before, grown

    _, grown = step(1)  # the round after step 1 adds block 1 (rows/columns 1:2), born at t0 = 1
    assert grown == ["l"] and layer.block_sizes == [1, 1]
    for t in (2, 3, 5, 6):
        before, _ = step(t)
        f = min(1.0, (t - 1) / 4)  # lr(t) * min(1, (t - t0) / N), lr = 1
        A, B, L, U = (p.detach() for p in (layer.A, layer.B, layer.L, layer.U))
        a, b, l, u = (before[n] for n in "ABLU")
        assert torch.allclose(A[1:2] - a[1:2], torch.full_like(a[1:2], -f))   # the new block's row of A
        assert torch.allclose(B[:, 1:2] - b[:, 1:2], torch.full_like(b[:, 1:2], -f))
        assert torch.allclose(L[1:2, :2] - l[1:2, :2], torch.full_like(l[1:2, :2], -f))  # its row block P_1
        assert torch.allclose(U[:2, 1:2] - u[:2, 1:2], torch.full_like(u[:2, 1:2], -f))  # its column block Q_1
        assert torch.allclose(A[:1] - a[:1], torch.full_like(a[:1], -1.0))  # block 0 at the full rate
        assert torch.allclose(L[:1, :1] - l[:1, :1], torch.full_like(l[:1, :1], -1.0))
        assert_rest_is_zero(layer)  # the warmup touches nothing outside the blocks


# ----------------------------------------------------------------------------- advance learning

def test_advance_block_trains_ahead_and_goes_live_without_changing_dW():
    torch.manual_seed(0)
    layer = IncreLoRALinear(linear(8, 6), rank=1, ref_rank=4, advance=2)  # capacity 6, s = 4
    assert layer.n_trainable == (1 + 2) * (8 + 6) + 2  # the advance block is held and counted
    assert layer.advance == 2 and torch.count_nonzero(layer.A[1:3]) == 2 * 8
    assert torch.count_nonzero(layer.A[3:]) == 0 and torch.count_nonzero(layer.B) == 0
    assert torch.equal(layer.ahead[1:3, 1:3], 4 * ADVANCE_EPS * torch.eye(2))  # s eps, frozen
    assert torch.count_nonzero(layer.ahead) == 2 and not layer.ahead.requires_grad
    x = torch.randn(5, 8)
    layer(x).pow(2).sum().backward()
    # B's advance columns get a gradient at once (eps-sized: A's advance rows times the frozen eps), A's
    # advance rows not yet (B's columns are 0)
    assert layer.B.grad[:, 1:3].abs().sum() > 0 and layer.A.grad[1:3].abs().sum() == 0
    assert torch.count_nonzero(layer.A.grad[3:]) == 0 and torch.count_nonzero(layer.B.grad[:, 3:]) == 0
    with torch.no_grad():  # as if trained ahead for a while
        layer.B[:, :3].normal_()
    A_next, B_next = layer.A[1:3].detach().clone(), layer.B[:, 1:3].detach().clone()
    before, y = layer.delta_weight(), layer(x)
    layer.grow(2)
    assert torch.allclose(layer.delta_weight(), before, atol=1e-7) and torch.allclose(layer(x), y, atol=1e-6)
    assert torch.equal(layer.A[1:3], A_next) and torch.equal(layer.B[:, 1:3], B_next)  # the trained values
    assert torch.equal(layer.core()[1:, 1:], ADVANCE_EPS * torch.eye(2))            # the frozen eps, now live
    # a fresh next block: rows 3:5 of A drawn, columns 3:5 of B zero, its eps in `ahead`
    assert layer.advance == 2 and torch.count_nonzero(layer.A[3:5]) == 2 * 8
    assert torch.count_nonzero(layer.B[:, 3:]) == 0 and torch.count_nonzero(layer.A[5:]) == 0
    assert torch.nonzero(layer.ahead).tolist() == [[3, 3], [4, 4]]
    layer.drop_advance()
    assert layer.n_trainable == 3 * (8 + 6) + 2 * (1 * 1 + 2 * 3) and layer.advance == 0
    assert torch.count_nonzero(layer.A[3:]) == 0 and torch.count_nonzero(layer.ahead) == 0
    assert layer.adapter_entry()["advance"] == 0 and layer.adapter_entry()["A_next"].shape == (0, 8)
    assert_rest_is_zero(layer)


def test_the_allocator_drops_advance_blocks_once_the_budget_is_spent():
    layers = {n: IncreLoRALinear(linear(4, 4, i), rank=1, ref_rank=2, advance=1) for i, n in enumerate("ab")}
    params = [p for l in layers.values() for p in l.parameters(recurse=False)]
    opt = torch.optim.AdamW(params, lr=0.1)
    allocator = IncreLoRAAllocator(layers, total_steps=10, schedule="topk", top_k=1, rank_step=1, optimizer=opt)
    assert len(opt.param_groups[0]["params"]) == 2 * 4  # A, B, L, U per layer; the advance block is in A, B
    x = torch.randn(8, 4)
    for t in (1, 2):
        sum(l(x).pow(2).sum() for l in layers.values()).backward()
        opt.step()
        if t == 1:  # step 1 moved no core (B was 0): a's moves here, so that a alone grows
            with torch.no_grad():
                layers["a"].P[0].fill_(2.0)
        grown = allocator.update_and_allocate(t)
        opt.zero_grad()
        if t == 1:  # the advance block went live and a fresh one came: both start with zero moments
            assert grown == ["a"] and layers["a"].advance == 1 and layers["b"].advance == 1
            state = opt.state[layers["a"].B]
            assert torch.count_nonzero(state["exp_avg"][:, 1:3]) == 0
            assert torch.count_nonzero(state["exp_avg_sq"][:, 1:3]) == 0
            assert torch.count_nonzero(state["exp_avg"][:, 0]) > 0
    assert grown == ["b"] and allocator.total_rank == 4 and all(l.advance == 0 for l in layers.values())
    # the same tensors all along; the dropped blocks are zero, and so are their moments
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]
    assert len(opt.state) == 2 * 4 and {id(p) for p in opt.state} == {id(p) for p in params}
    for layer in layers.values():
        r = layer.rank
        assert torch.count_nonzero(layer.A[r:]) == 0 and torch.count_nonzero(layer.B[:, r:]) == 0
        assert torch.count_nonzero(layer.ahead) == 0 and not layer.frozen_ahead
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(opt.state[layer.A][key][r:]) == 0
            assert torch.count_nonzero(opt.state[layer.B][key][:, r:]) == 0
            assert torch.count_nonzero(opt.state[layer.B][key][:, :r]) > 0  # the live ones keep theirs
        assert_rest_is_zero(layer)


def test_adapter_state_round_trips_the_variants():
    torch.manual_seed(0)
    for kw in (dict(core="diagonal"), dict(advance=2)):
        model = nn.Sequential(nn.Linear(8, 8))
        (layer,) = triadapt.inject(model, ["0"], layer_cls=IncreLoRALinear, rank=1, ref_rank=4, **kw).values()
        layer.grow(2)
        with torch.no_grad():
            for name, mask in trainable_masks(layer).items():
                getattr(layer, name).add_(torch.randn_like(mask) * mask)
        state = adapters.adapter_state({"0": layer})
        assert state["0"]["A"].shape == (3, 8) and state["0"]["advance"] == kw.get("advance", 0)
        assert state["0"]["A_next"].shape == (kw.get("advance", 0), 8) and state["0"]["kind"] == "increlora"
        fresh = nn.Sequential(nn.Linear(8, 8))
        fresh.load_state_dict({"0.weight": layer.base.weight, "0.bias": layer.base.bias})
        (loaded,) = adapters.load_adapter(fresh, state).values()
        x = torch.randn(3, 8)
        assert isinstance(loaded, IncreLoRALinear) and torch.equal(loaded(x), layer(x))
        assert loaded.core_kind == layer.core_kind and loaded.block_sizes == layer.block_sizes == [1, 2]
        assert loaded.advance == layer.advance and torch.equal(loaded.delta_weight(), layer.delta_weight())


def test_a_growth_smaller_than_the_advance_block_keeps_the_rest_of_it():
    torch.manual_seed(0)
    layer = IncreLoRALinear(linear(8, 6), rank=1, ref_rank=4, advance=3)
    with torch.no_grad():
        layer.B[:, 1:4].normal_()
    A_next, B_next = layer.A[1:4].detach().clone(), layer.B[:, 1:4].detach().clone()
    before = layer.delta_weight()
    layer.grow(1)  # takes one row of the advance block; the other two stay in it, trained
    assert torch.allclose(layer.delta_weight(), before, atol=1e-7)
    assert layer.rank == 2 and layer.advance == 3
    assert torch.equal(layer.A[1], A_next[0]) and torch.equal(layer.B[:, 1], B_next[:, 0])  # went live
    assert torch.equal(layer.A[2:4], A_next[1:]) and torch.equal(layer.B[:, 2:4], B_next[:, 1:])  # kept
    assert torch.count_nonzero(layer.B[:, 4:]) == 0 and torch.count_nonzero(layer.A[4]) == 8  # one fresh row
    assert_rest_is_zero(layer)


@pytest.mark.parametrize("core", ["triangular", "diagonal"])
def test_every_factor_of_an_increlora_style_layer_trains_within_two_steps(core):
    torch.manual_seed(0)
    layer = IncreLoRALinear(linear(8, 6), rank=2, ref_rank=4, core=core, advance=2)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 8)
    got = {}
    for _ in range(2):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        parts = {"A": layer.A.grad[:2], "B": layer.B.grad[:, :2], "L": layer.L.grad * layer.L_mask,
                 "U": layer.U.grad * layer.U_mask, "A_next": layer.A.grad[2:4], "B_next": layer.B.grad[:, 2:4]}
        for n, g in parts.items():
            got[n] = got.get(n, False) or bool(g.abs().sum() > 0)
        # nothing else ever gets a gradient
        assert torch.count_nonzero(layer.A.grad[4:]) == 0 and torch.count_nonzero(layer.B.grad[:, 4:]) == 0
        assert torch.count_nonzero(layer.L.grad * (layer.L_mask == 0)) == 0
        assert torch.count_nonzero(layer.U.grad * (layer.U_mask == 0)) == 0
        opt.step()
    expected = {"A", "B", "L", "A_next", "B_next"} | ({"U"} if core == "triangular" else set())
    assert {n for n, g in got.items() if g} == expected


# ----------------------------------------------------------------------------- trainable counts

def gradient_count(model, seed=0):
    """How many numbers of `model` get a gradient at random values of what trains: an independent count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IncreLoRALinear) or type(m) is triadapt.TriAdaptLinear:
                masks = trainable_masks(m) if isinstance(m, IncreLoRALinear) else {
                    "A": (torch.arange(m.capacity) < m.rank).to(m.A.dtype)[:, None].expand_as(m.A),
                    "B": (torch.arange(m.capacity) < m.rank).to(m.B.dtype)[None, :].expand_as(m.B),
                    "L": (m.L_mask != 0).to(m.A.dtype), "U": (m.U_mask != 0).to(m.A.dtype)}
                for name, mask in masks.items():
                    p = getattr(m, name)
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * mask)
            elif isinstance(m, (LoRALinear, AdaLoRALinear)):
                for p in m.parameters(recurse=False):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)  # small values, float64: no tanh saturates
    (model(x) * torch.randn(7, 4, generator=g, dtype=torch.float64)).sum().backward()
    return sum(int(torch.count_nonzero(p.grad)) for p in params)


def tiny():
    """Two adapted matrices: "0" is 6 -> 5 (d_in + d_out = 11), "2" is 5 -> 4 (9)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


@pytest.mark.parametrize("variant,kw,expected", [
    # blocks [1, 2] on "0", [1, 1] on "2": r (d_in + d_out) + 2 sum_j k_j R_j
    ("triadapt", {}, (3 * 11 + 2 * (1 * 1 + 2 * 3)) + (2 * 9 + 2 * (1 * 1 + 1 * 2))),      # 47 + 24 = 71
    # one lambda per rank: r (d_in + d_out) + r
    ("diagonal", dict(core="diagonal"), (3 * 11 + 3) + (2 * 9 + 2)),                     # 36 + 20 = 56
    # the advance block's a rows of A and columns of B train too (its core entry is frozen)
    ("advance", dict(advance=1), ((3 + 1) * 11 + 14) + ((2 + 1) * 9 + 6)),               # 58 + 33 = 91
    ("advance-diagonal", dict(advance=1, core="diagonal"), ((3 + 1) * 11 + 3) + ((2 + 1) * 9 + 2)),  # 47 + 29
])
def test_trainable_counts_of_the_growing_variants_closed_form(variant, kw, expected):
    model = tiny()
    cls = triadapt.TriAdaptLinear if variant == "triadapt" else IncreLoRALinear
    layers = triadapt.inject(model, ["0", "2"], layer_cls=cls, rank=1, ref_rank=2, **kw)
    layers["0"].grow(2)
    layers["2"].grow(1)
    assert [l.block_sizes for l in layers.values()] == [[1, 2], [1, 1]]
    assert triadapt.count_trainable(model) == sum(l.n_trainable for l in layers.values()) == expected
    assert gradient_count(model) == expected


def test_trainable_counts_of_lora_and_adalora_closed_form():
    model = tiny()
    triadapt.inject(model, ["0", "2"], layer_cls=LoRALinear, rank=2)
    assert triadapt.count_trainable(model) == 2 * 11 + 2 * 9 == gradient_count(model)  # r (d_in + d_out): 40

    model = tiny()
    layers = triadapt.inject(model, ["0", "2"], layer_cls=AdaLoRALinear, rank=3, ref_rank=2)
    held = 3 * (11 + 1) + 3 * (9 + 1)  # r (d_in + d_out + 1): 36 + 30 = 66
    assert sum(l.n_held for l in layers.values()) == held == triadapt.count_trainable(model)
    assert gradient_count(model) == held  # every triplet trains while all are live
    layers["0"].set_live(torch.tensor([True, False, True]))
    layers["2"].set_live(torch.tensor([False, False, True]))
    # the final adapter: live (d_in + d_out + 1); the masked triplets are still held (and still train)
    assert [l.n_trainable for l in layers.values()] == [2 * 12, 1 * 10]
    assert triadapt.count_trainable(model) == 34 and sum(l.n_held for l in layers.values()) == held
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == held


# ----------------------------------------------------------------------------- at the cap, and past the capacity

def test_a_growth_near_the_cap_with_an_advance_block_keeps_the_tensors():
    # grow() reserves r + k + advance, which can pass min(d_in, d_out): at max_rank there is nothing to
    # re-create (the advance block shrinks to what is left)
    torch.manual_seed(0)
    layer = IncreLoRALinear(linear(4, 4), rank=1, ref_rank=2, advance=2)  # capacity 4 = min(d_in, d_out)
    ids = [id(p) for p in layer.parameters() if p.requires_grad]
    layer.grow(2)  # reserve(1 + 2 + 2 = 5): nothing can be added past 4, and nothing needs to be
    assert layer.capacity == 4 and layer.rank == 3 and layer.advance == 1
    assert [id(p) for p in layer.parameters() if p.requires_grad] == ids


def test_an_advance_block_going_live_in_a_capacity_doubling_starts_with_zero_moments():
    # the allocator moves the optimizer's state into the re-created tensors: the moments must be zeroed
    # there, or the advance block's trained-ahead moments come along
    trainable = lambda: [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    (layer,) = triadapt.inject(model, ["0"], layer_cls=IncreLoRALinear, rank=1, ref_rank=1, advance=1).values()
    assert layer.capacity == 2
    opt = torch.optim.AdamW(trainable(), lr=0.1)
    allocator = IncreLoRAAllocator({"0": layer}, total_steps=10, target_total_rank=4, schedule="topk",
                                   rank_step=1, optimizer=opt)
    layer(torch.randn(8, 16)).pow(2).sum().backward()
    opt.step()
    assert torch.count_nonzero(opt.state[layer.B]["exp_avg"][:, 1]) > 0  # the advance column trained ahead
    assert allocator.update_and_allocate(1) == ["0"] and layer.capacity == 4  # r = 2 + advance 1 > 2
    assert allocator.recreated == ["0"] and opt.param_groups[0]["params"] == trainable()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(opt.state[layer.B][key][:, 1:]) == 0  # as within the capacity
