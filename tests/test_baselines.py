"""The math of baselines.py (AdaLoRA) against values computed by hand (the comments show the arithmetic)."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import AdaLoRAAllocator, AdaLoRALinear
from triadapt import inject, orthogonal_penalty


def set_(p, values):
    with torch.no_grad():
        p.copy_(torch.tensor(values, dtype=p.dtype))


def hand_layer():
    """A 2x3 layer of rank 2 with A, B, E set by hand."""
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(3, 2), rank=2, ref_rank=2)
    set_(layer.A, [[1., 2., 0.], [0., 1., -1.]])
    set_(layer.B, [[1., 0.], [2., 1.]])
    set_(layer.E, [1., -2.])
    return layer


def set_grads(layer, gA, gB, gE):
    for p, g in ((layer.A, gA), (layer.B, gB), (layer.E, gE)):
        p.grad = torch.tensor(g, dtype=p.dtype)


def random_layers(n, rank, d_in=5, d_out=4, seed=0):
    torch.manual_seed(seed)
    return {f"l{i}": AdaLoRALinear(nn.Linear(d_in, d_out), rank=rank, ref_rank=rank - 1) for i in range(n)}


def ranks(layers):
    """{name: rank} of a dict of adapter layers (an allocator's .layers, say)."""
    return {n: l.rank for n, l in layers.items()}


def random_grads(layers, g, perturb_E=False):
    """Stand-in for a training step: new gradients, and (perturb_E) masked E entries that trained."""
    for layer in layers.values():
        for p in (layer.A, layer.B, layer.E):
            p.grad = torch.randn(p.shape, generator=g)
        if perturb_E:
            with torch.no_grad():
                layer.E.add_(torch.randn(layer.E.shape, generator=g))


# ----------------------------------------------------------------------------- the layer

def test_function_at_init_is_the_base():
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(8, 6), rank=4)
    assert torch.count_nonzero(layer.E) == 0 and torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.count_nonzero(layer.A) == layer.A.numel()
    assert torch.count_nonzero(layer.B) == layer.B.numel()
    assert not any(p.requires_grad for p in layer.base.parameters())
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), layer.base(x))
    assert layer.rank == 4 and layer.live.all() and layer.scale == 16.0 / 8 and layer.ref_rank == 8


def test_delta_weight_by_hand():
    layer = AdaLoRALinear(nn.Linear(3, 2), rank=2, alpha=4.0, ref_rank=2)  # s = 2
    set_(layer.A, [[1., 0., 2.], [0., 1., 1.]])
    set_(layer.B, [[1., 2.], [0., 1.]])
    set_(layer.E, [2., 3.])
    # B diag(E) = [[2,6],[0,3]]; times A: [[2,6,10],[0,3,3]]; times s = 2.
    assert torch.equal(layer.delta_weight(), torch.tensor([[4., 12., 20.], [0., 6., 6.]]))
    x = torch.tensor([[1., 1., 1.]])
    assert torch.allclose(layer(x) - layer.base(x), torch.tensor([[36., 12.]]))


def test_forward_is_dense_formula_float64():
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(7, 5).double(), rank=3, alpha=6.0, ref_rank=4)
    with torch.no_grad():
        layer.E.copy_(torch.randn(3, dtype=torch.float64))
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    W, b = layer.base.weight, layer.base.bias
    dW = layer.scale * layer.B @ torch.diag(layer.E) @ layer.A  # (d_out, d_in)
    assert torch.allclose(layer(x), x @ W.t() + b + x @ dW.t())


def test_merge_unmerge():
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(7, 5).double(), rank=3)
    with torch.no_grad():
        layer.E.copy_(torch.randn(3, dtype=torch.float64))
    x = torch.randn(4, 7, dtype=torch.float64)
    W0, y0 = layer.base.weight.clone(), layer(x)
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y0)
    layer.merge()  # a second merge is a no-op
    assert torch.allclose(layer(x), y0)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base.weight, W0) and torch.allclose(layer(x), y0)


@pytest.mark.parametrize("d_in,d_out,r,live", [(3, 2, 2, 1), (16, 12, 6, 4), (16, 12, 6, 0)])
def test_n_trainable_closed_form(d_in, d_out, r, live):
    layer = AdaLoRALinear(nn.Linear(d_in, d_out), rank=r)
    assert layer.n_trainable == layer.n_held == r * (d_in + d_out + 1)  # every triplet live at init
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == r * (d_in + d_out + 1)
    layer.set_live(torch.arange(r) < live)
    assert layer.rank == live
    assert layer.n_trainable == live * (d_in + d_out + 1)
    assert layer.n_held == r * (d_in + d_out + 1)  # masked triplets still train


def test_live_mask_is_saved_and_restored():
    layer = hand_layer()
    layer.set_live(torch.tensor([False, True]))
    assert torch.equal(layer.E, torch.tensor([0., -2.]))
    state = layer.state_dict()
    assert torch.equal(state["live"], torch.tensor([False, True]))
    fresh = AdaLoRALinear(nn.Linear(3, 2), rank=2, ref_rank=2)
    assert fresh.rank == 2
    fresh.load_state_dict(state)
    assert fresh.rank == 1 and torch.equal(fresh.live, torch.tensor([False, True]))
    assert "r=2, live=1" in repr(fresh)


def test_orthogonal_penalty_works_on_adalora_layers():
    layer = hand_layer()
    # A A^T - I = [[4,2],[2,1]]; B^T B - I = [[4,2],[2,0]]: norms sqrt(25) = 5 and sqrt(24); over 2n = 2.
    expected = (5.0 + 24 ** 0.5) / 2
    assert orthogonal_penalty({"l": layer}).item() == pytest.approx(expected, rel=1e-6)


def test_every_factor_gets_a_gradient_within_two_steps():
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(6, 5), rank=3)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 6), torch.randn(8, 5)
    seen = []
    for _ in range(2):
        F.mse_loss(layer(x), y).backward()
        seen.append({k: int(torch.count_nonzero(getattr(layer, k).grad)) for k in ("A", "B", "E")})
        opt.step()
        opt.zero_grad()
    # Step 1: only E (A's and B's gradients carry a factor E = 0); step 2: all, E being non-zero then.
    assert seen[0] == {"A": 0, "B": 0, "E": 3}
    assert seen[1] == {"A": 3 * 6, "B": 5 * 3, "E": 3}


# ----------------------------------------------------------------------------- importance

def test_triplet_scores_by_hand_two_steps():
    layer = hand_layer()
    alloc = AdaLoRAAllocator({"l": layer}, total_steps=1000, target_total_rank=1, init_warmup=100,
                             beta1=0.5, beta2=0.5)
    # Step 1: I_A = |A * gA| = [[1,2,0],[0,2,2]], I_B = [[2,0],[2,2]], I_E = [2,2].
    # From zero, I_bar = I/2, U_bar = |I - I/2| / 2 = I/4, so S = I^2 / 8:
    #   S_A = [[1/8,1/2,0],[0,1/2,1/2]]: row means 5/24, 8/24
    #   S_B = [[1/2,0],[1/2,1/2]]:       column means 12/24, 6/24
    #   S_E = [1/2,1/2]:                 12/24, 12/24
    set_grads(layer, [[1., 1., 2.], [2., 2., 2.]], [[2., 3.], [1., -2.]], [2., 1.])
    assert alloc.update_and_allocate(1) == []  # warmup: scores only
    assert torch.allclose(alloc.triplet_scores()["l"], torch.tensor([29 / 24, 26 / 24]), rtol=1e-6, atol=0)
    # Step 2 (same A, B, E): I_A = [[0,2,0],[0,0,3]], I_B = [[0,0],[2,1]], I_E = [1,0].
    #   A: I_bar = [[1/4,3/2,0],[0,1/2,2]], |I - I_bar| = [[1/4,1/2,0],[0,1/2,1]],
    #      U_bar = ([[1/4,1/2,0],[0,1/2,1/2]] + that) / 2 = [[1/4,1/2,0],[0,1/2,3/4]],
    #      S_A = [[1/16,3/4,0],[0,1/4,3/2]]: row means 13/48, 28/48
    #   B: I_bar = [[1/2,0],[3/2,1]], |I - I_bar| = [[1/2,0],[1/2,0]], U_bar = [[1/2,0],[1/2,1/4]],
    #      S_B = [[1/4,0],[3/4,1/4]]: column means 24/48, 6/48
    #   E: I_bar = [1,1/2], |I - I_bar| = [0,1/2], U_bar = [1/4,1/2], S_E = [1/4,1/4]: 12/48, 12/48
    set_grads(layer, [[0., 1., 1.], [1., 0., 3.]], [[0., 1.], [1., 1.]], [1., 0.])
    alloc.update_and_allocate(2)
    assert torch.allclose(alloc.triplet_scores()["l"], torch.tensor([49 / 48, 46 / 48]), rtol=1e-6, atol=0)
    assert torch.equal(alloc.U_bar[2], torch.tensor([0.25, 0.5]))  # E's, of [A, B, E]


def test_uncertainty_uses_the_new_smoothed_importance():
    layer = hand_layer()
    alloc = AdaLoRAAllocator({"l": layer}, total_steps=1000, target_total_rank=1, init_warmup=100)
    set_grads(layer, [[0.] * 3] * 2, [[0.] * 2] * 2, [1., 0.])  # I_E = [1, 0]
    alloc.update_and_allocate(1)
    # I_bar = 0.15 * 1 = 0.15; U_bar = 0.15 * |1 - 0.15| = 0.1275 (the old I_bar = 0 would give 0.15).
    assert alloc.I_bar[2][0].item() == pytest.approx(0.15, rel=1e-6)
    assert alloc.U_bar[2][0].item() == pytest.approx(0.1275, rel=1e-6)


def test_missing_gradient_is_an_error():
    layer = hand_layer()
    alloc = AdaLoRAAllocator({"l": layer}, total_steps=10, target_total_rank=1)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        alloc.update_and_allocate(1)


# ----------------------------------------------------------------------------- budget and masking

def test_budget_cubic_table():
    layers = random_layers(3, rank=4)  # R_0 = 12
    alloc = AdaLoRAAllocator(layers, total_steps=100, target_total_rank=8, init_warmup=10, final_warmup=10)
    # t_i = 10, t_e = 90, D = 80: b = 8 + floor(4 * (90 - t)^3 / 512000)
    table = {1: 12, 10: 12,
             11: 11,   # 4 * 79^3 = 1972156 -> 3.85: floor 3 (rounding would keep 12)
             17: 11,   # 4 * 73^3 = 1556068 -> 3.04
             18: 10,   # 4 * 72^3 = 1492992 -> 2.92
             26: 10,   # 4 * 64^3 = 1048576 -> 2.05
             27: 9,    # 4 * 63^3 = 1000188 -> 1.95
             30: 9,    # 4 * (3/4)^3 = 1.6875
             39: 9,    # 4 * 51^3 = 530604 -> 1.04
             40: 8,    # 4 * 50^3 = 500000 -> 0.98
             50: 8, 90: 8, 91: 8, 100: 8}
    assert {t: alloc.budget(t) for t in table} == table
    default = AdaLoRAAllocator(layers, total_steps=600)
    assert default.final_warmup == 100 and default.mask_end == 500
    assert default.target_total_rank == 3 * 3  # ref_rank * layers


@pytest.mark.parametrize("T,init_warmup,final_warmup,interval,mask_steps", [
    (8, 50, None, 1, [8]),     # warmup past the end: t_e = t_i = T - 1, the final mask at T
    (10, 2, 0, 4, [4, 8, 10]),  # no final phase asked: t_e = T - 1 = 9, D = 7; the cubic at 4 and 8
])
def test_every_run_ends_at_the_target(T, init_warmup, final_warmup, interval, mask_steps):
    layers = random_layers(2, rank=4)  # R_0 = 8, R_T = 6
    alloc = AdaLoRAAllocator(layers, total_steps=T, init_warmup=init_warmup, final_warmup=final_warmup,
                             interval=interval)
    masked, mask_to = [], alloc.mask_to
    alloc.mask_to = lambda t, budget: masked.append((t, budget)) or mask_to(t, budget)
    g = torch.Generator().manual_seed(0)
    for t in range(1, T + 1):
        random_grads(layers, g)
        alloc.update_and_allocate(t)
    assert alloc.mask_end == T - 1 and alloc.total_rank == 6
    # b(4) = 6 + floor(2 * 5^3 / 7^3) = 6 + floor(250 / 343) = 6, as b(8) and the final mask
    assert masked == [(t, 6) for t in mask_steps]


def test_bad_target_is_an_error():
    layers = random_layers(2, rank=3)
    with pytest.raises(ValueError, match="target total rank 7"):
        AdaLoRAAllocator(layers, total_steps=100, target_total_rank=7)


@pytest.mark.parametrize("interval", [1, 3])
def test_masking_keeps_exactly_the_budget_and_the_final_phase_the_target(interval):
    layers = random_layers(3, rank=4)
    alloc = AdaLoRAAllocator(layers, total_steps=100, target_total_rank=8, init_warmup=10, final_warmup=10,
                             interval=interval)
    g = torch.Generator().manual_seed(0)
    final = None
    for t in range(1, 101):
        before = ranks(alloc.layers)
        random_grads(layers, g, perturb_E=True)
        changed = alloc.update_and_allocate(t)
        assert changed == [n for n in layers if ranks(alloc.layers)[n] != before[n]]
        if t <= 10:
            assert alloc.total_rank == 12
        elif t <= 90 and t % interval == 0:
            assert alloc.total_rank == alloc.budget(t)
        elif t <= 90:
            assert ranks(alloc.layers) == before
        if t > 90:
            assert alloc.total_rank == 8
            pattern = [l.live.clone() for l in layers.values()]
            final = final or pattern
            assert all(torch.equal(a, b) for a, b in zip(pattern, final))  # fixed at t = 91
        if t > 90 or (t > 10 and t % interval == 0):
            assert all(torch.count_nonzero(l.E[~l.live]) == 0 for l in layers.values())
    assert alloc.events and alloc.events[-1][0] <= 91
    last = {}
    for _, name, rank in alloc.events:
        last[name] = rank
    assert all(last.get(n, 4) == r for n, r in ranks(alloc.layers).items())
    assert sum(l.n_trainable for l in layers.values()) == 8 * (5 + 4 + 1)
    assert sum(l.n_held for l in layers.values()) == 12 * (5 + 4 + 1)  # every triplet trains


def test_ties_keep_layer_order_then_index():
    layers = random_layers(2, rank=12, d_in=16, d_out=12)  # 24 ties: enough for an unstable sort to reorder
    layers = {"a": layers["l0"], "b": layers["l1"]}
    alloc = AdaLoRAAllocator(layers, total_steps=1, target_total_rank=14, final_warmup=0)
    for layer in layers.values():
        for p in (layer.A, layer.B, layer.E):
            p.grad = torch.zeros_like(p)  # every score 0
    assert alloc.budget(1) == 14
    assert alloc.update_and_allocate(1) == ["b"]
    assert layers["a"].live.all() and layers["b"].live.tolist() == [True] * 2 + [False] * 10
    assert alloc.events == [(1, "b", 2)]


def test_final_mask_is_kept_across_a_resume():
    layers = random_layers(2, rank=3)  # R_0 = 6, R_T = 2 * 2 = 4
    favour = {"l0": lambda s: {"l0": torch.tensor([3., 2., 1.]), "l1": torch.zeros(3)},
              "l1": lambda s: {"l0": torch.zeros(3), "l1": torch.tensor([3., 2., 1.])}}
    alloc = AdaLoRAAllocator(layers, total_steps=4, final_warmup=2, sync=favour["l0"])  # t_e = 2
    g = torch.Generator().manual_seed(0)
    for t in (1, 2, 3):  # the cubic at 1 and 2, the final mask at 3
        random_grads(layers, g)
        alloc.update_and_allocate(t)
    assert ranks(alloc.layers) == {"l0": 3, "l1": 1} and alloc.final_mask_set
    resumed = AdaLoRAAllocator(layers, total_steps=4, final_warmup=2, sync=favour["l1"])
    resumed.load_state_dict(alloc.state_dict())
    random_grads(layers, g, perturb_E=True)
    assert resumed.update_and_allocate(4) == []  # the final mask stays, whatever the scores say now
    assert ranks(resumed.layers) == {"l0": 3, "l1": 1}
    assert torch.count_nonzero(layers["l1"].E[1:]) == 0


def test_sync_decides_what_is_kept():
    layers = random_layers(2, rank=3)
    favour_l1 = lambda scores: {"l0": torch.zeros(3), "l1": torch.tensor([1., 3., 2.])}
    alloc = AdaLoRAAllocator(layers, total_steps=1, target_total_rank=2, final_warmup=0, sync=favour_l1)
    random_grads(layers, torch.Generator().manual_seed(0))
    alloc.update_and_allocate(1)
    assert layers["l0"].rank == 0 and layers["l1"].live.tolist() == [False, True, True]
    assert torch.equal(alloc.scores["l1"], torch.tensor([1., 3., 2.]))


# ----------------------------------------------------------------------------- training and resume

T = 30


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    layers = inject(model, ["0", "2"], layer_cls=AdaLoRALinear, rank=3, ref_rank=2, init_std=0.3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    alloc = AdaLoRAAllocator(layers, total_steps=T, init_warmup=3, final_warmup=5, interval=2)  # R: 6 -> 4
    return model, layers, opt, alloc


def train(model, layers, opt, alloc, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    for t in steps:
        g = torch.Generator().manual_seed(t)  # the data of step t, whoever runs it
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)
        loss = F.mse_loss(model(x), y) + 0.1 * orthogonal_penalty(layers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        alloc.update_and_allocate(t)
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stop", [2, 13, 26, 27])  # warmup, cubic phase, final mask, fixed phase
def test_exact_resume(stop):
    model, layers, opt, alloc = build()
    train(model, layers, opt, alloc, range(1, T + 1))
    assert alloc.total_rank == 4 and alloc.events

    model2, layers2, opt2, alloc2 = build()
    train(model2, layers2, opt2, alloc2, range(1, stop + 1))
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "alloc": alloc2.state_dict()}, buf)
    del model2, layers2, opt2, alloc2
    buf.seek(0)
    ckpt = torch.load(buf)
    model3, layers3, opt3, alloc3 = build()
    alloc3.load_state_dict(ckpt["alloc"])
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    train(model3, layers3, opt3, alloc3, range(stop + 1, T + 1))

    straight, resumed = model.state_dict(), model3.state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # parameters and live masks
    assert alloc3.events == alloc.events and ranks(alloc3.layers) == ranks(alloc.layers)
    assert all(torch.equal(a, b) for a, b in zip(alloc.I_bar + alloc.U_bar, alloc3.I_bar + alloc3.U_bar))
