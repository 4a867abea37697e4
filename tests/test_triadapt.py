"""The math of triadapt.py against values computed by hand (see the comments next to each number)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import LoRALinear
from triadapt import (RankAllocator, TriAdaptLinear, count_trainable, growth_count, inject,
                      normalized_frobenius, orthogonal_penalty)


def layer_with_blocks(blocks, d_in=8, d_out=6, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    layer = TriAdaptLinear(nn.Linear(d_in, d_out).to(dtype), rank=blocks[0], **kw)
    for k in blocks[1:]:
        layer.grow(k)
    return layer


def trainable_masks(layer):
    """{name: 0/1 mask} of the entries that train: A[:r], B[:, :r] and the blocks' entries of L and U."""
    r = layer.rank
    A, B = torch.zeros_like(layer.A), torch.zeros_like(layer.B)
    A[:r], B[:, :r] = 1, 1
    return {"A": A, "B": B, "L": (layer.L_mask != 0).to(A.dtype), "U": (layer.U_mask != 0).to(A.dtype)}


def randomize(layer, seed=1):
    """Random values on the entries that train, 0 on the rest (what training can reach)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mask in trainable_masks(layer).items():
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * mask)


def assert_rest_is_zero(layer):
    """Past the rank and outside the blocks every stored entry is exactly 0."""
    for name, mask in trainable_masks(layer).items():
        assert torch.count_nonzero(getattr(layer, name) * (1 - mask)) == 0, name


def ranks(layers):
    """{name: rank} of a dict of adapter layers (an allocator's .layers, say)."""
    return {n: l.rank for n, l in layers.items()}


# ----------------------------------------------------------------------------- the core

def test_core_blocks_1_2_by_hand():
    layer = layer_with_blocks([1, 2])
    with torch.no_grad():
        layer.P[0].copy_(torch.tensor([[1.]]))
        layer.Q[0].copy_(torch.tensor([[2.]]))
        layer.P[1].copy_(torch.tensor([[3., 4., 5.], [6., 7., 8.]]))
        layer.Q[1].copy_(torch.tensor([[1., 2.], [3., 4.], [5., 6.]]))
    # L = [[1,0,0],[3,4,5],[6,7,8]], U = [[2,1,2],[0,3,4],[0,5,6]]; the diagonal blocks get both.
    expected = torch.tensor([[3., 1., 2.],
                             [3., 7., 9.],
                             [6., 12., 14.]])
    assert torch.equal(layer.core(), expected)
    # ||C||_F^2 = (9+1+4) + (9+49+81) + (36+144+196) = 529 = 23^2, so N = 23 / 3.
    assert normalized_frobenius(layer.core()) == pytest.approx(23 / 3, rel=1e-7)


def test_initial_core_is_identity_and_delta_zero():
    layer = layer_with_blocks([2, 1, 3])
    assert torch.equal(layer.core(), torch.eye(6))
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert normalized_frobenius(layer.core()) == pytest.approx(1 / math.sqrt(6))


def test_delta_weight_by_hand():
    layer = TriAdaptLinear(nn.Linear(3, 2), rank=2, alpha=4.0, ref_rank=2)  # s = 2
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1., 0., 2.], [0., 1., 1.]]))
        layer.B.copy_(torch.tensor([[1., 2.], [0., 1.]]))
        layer.P[0].copy_(torch.tensor([[1., 1.], [0., 2.]]))
        layer.Q[0].zero_()
    # C A = [[1,1,3],[0,2,2]]; B C A = [[1,5,7],[0,2,2]]; times s = 2.
    assert torch.equal(layer.delta_weight(), torch.tensor([[2., 10., 14.], [0., 4., 4.]]))
    x = torch.tensor([[1., 1., 1.]])
    assert torch.allclose(layer(x) - layer.base(x), torch.tensor([[26., 8.]]))


@pytest.mark.parametrize("blocks,core_params", [
    ((2,), 8),             # 2 * (2*2)
    ((1, 2), 14),          # 2 * (1*1 + 2*3)
    ((1, 4, 4), 114),      # 2 * (1*1 + 4*5 + 4*9), SPEC section 2
    ((3, 1, 1, 1), 48),    # 2 * (3*3 + 1*4 + 1*5 + 1*6)
])
def test_trainable_parameter_count_closed_form(blocks, core_params):
    d_in, d_out = 16, 12
    layer = layer_with_blocks(list(blocks), d_in=d_in, d_out=d_out)
    r, c = sum(blocks), layer.capacity
    assert c == 12  # min(min(d_in, d_out) = 12, max(r, 2 r_ref = 16))
    assert layer.n_trainable == r * (d_in + d_out) + core_params
    # Stored at the fixed capacity c whatever the blocks; the masks mark exactly the entries that train.
    assert [p.shape for p in layer.parameters() if p.requires_grad] == [(c, d_in), (d_out, c), (c, c), (c, c)]
    masked_in = int(torch.count_nonzero(layer.L_mask) + torch.count_nonzero(layer.U_mask))
    assert r * (d_in + d_out) + masked_in == layer.n_trainable
    assert set(torch.cat([layer.L_mask.flatten(), layer.U_mask.flatten()]).tolist()) == {0.0, layer.scale}  # s = 2
    corner = torch.zeros(c, c)
    corner[:r, :r] = 1
    assert torch.equal(layer.gram_mask, corner)
    assert torch.count_nonzero(layer.L_mask * (1 - corner)) == 0
    assert torch.count_nonzero(layer.U_mask * (1 - corner)) == 0
    # The active factors A[:r], B[:, :r]: A's rows drawn, B zero; everything past r is zero.
    assert layer.A[:r].shape == (r, d_in) and torch.count_nonzero(layer.A[:r]) == r * d_in
    assert layer.B[:, :r].shape == (d_out, r) and torch.count_nonzero(layer.B) == 0
    assert torch.count_nonzero(layer.A[r:]) == 0 and layer.core().shape == (r, r)
    assert_rest_is_zero(layer)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("p,deficit,linear,exponential", [
    (0.05, 112, 5, 1),     # SPEC table, t = 145: 112 * 0.05 = 5.6; 112 ** 0.05 = 1.266
    (0.5, 112, 56, 10),    # t = 550: 112 ** 0.5 = 10.58
    (1.0, 112, 112, 112),  # t = 1000
    (0.0, 112, 0, 1),      # first instant: linear asks for none (clamped to 1 later), exponential 1
    (0.3, 10, 3, 1),       # 10 * 0.3 = 3.0000000000000004; 10 ** 0.3 = 1.995
    (1 / 3, 1000, 333, 10),  # 1000 ** (1/3) is 9.999999999999998 in floating point
    (0.75, 16, 12, 8),     # 16 ** 0.75 = 8
])
def test_growth_count_table(p, deficit, linear, exponential):
    assert growth_count("linear", p, deficit) == linear
    assert growth_count("exponential", p, deficit) == exponential
    assert growth_count("topk", p, deficit, top_k=3) == 3


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown schedule 'cosine': choose one of linear, exponential, topk"):
        growth_count("cosine", 0.5, 10)
    with pytest.raises(ValueError, match="unknown schedule"):
        RankAllocator({"a": layer_with_blocks([1])}, total_steps=10, schedule="cosine")


# ----------------------------------------------------------------------------- gradients, growth, merge

def test_gradcheck_after_growth_float64():
    layer = layer_with_blocks([1, 2], d_in=5, d_out=4, dtype=torch.float64)
    randomize(layer)
    x = torch.randn(3, 5, dtype=torch.float64)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names == ["A", "B", "L", "U"]  # one tensor per factor; L and U's masked entries get no gradient
    values = tuple(p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if p.requires_grad)

    def f(*params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))
    assert torch.autograd.gradcheck(f, values)


def test_growth_preserves_the_function_exactly():
    layer = layer_with_blocks([2, 1], d_in=10, d_out=7, dtype=torch.float64)
    randomize(layer)
    x = torch.randn(4, 10, dtype=torch.float64)
    before, dW = layer(x), layer.delta_weight()
    tensors = [layer.A, layer.B, layer.L, layer.U, layer.L_mask, layer.U_mask, layer.gram_mask]
    assert layer.capacity == 7  # min(7, max(3, 16))
    layer.grow(3)
    # In place: the same tensors (an optimizer or DDP holding them sees nothing change).
    assert all(p is q for p, q in zip(tensors, [layer.A, layer.B, layer.L, layer.U, layer.L_mask, layer.U_mask,
                                                 layer.gram_mask], strict=True))
    block = [layer.A[3:6], layer.B[:, 3:6], layer.P[2], layer.Q[2]]  # the new block's parts
    assert [p.shape for p in block] == [(3, 10), (7, 3), (3, 6), (6, 3)]
    assert torch.count_nonzero(layer.A[3:6]) == 3 * 10 and torch.count_nonzero(layer.B[:, 3:6]) == 0
    assert torch.count_nonzero(layer.A[6:]) == 0 and torch.count_nonzero(layer.B[:, 6:]) == 0
    assert_rest_is_zero(layer)
    assert layer.block_sizes == [2, 1, 3] and layer.rank == 6
    # dW is bit-identical; the factored output only moves by rounding, because BLAS sums the
    # longer inner products (now with exact zeros in them) in another order.
    assert torch.equal(layer.delta_weight(), dW)
    assert torch.allclose(layer(x), before, rtol=0, atol=1e-12)
    assert torch.equal(layer.core()[3:, 3:], torch.eye(3, dtype=torch.float64))
    assert torch.count_nonzero(layer.core()[:3, 3:]) == 0


def test_growth_past_the_capacity_doubles_it_keeping_dW_and_the_old_values():
    layer = layer_with_blocks([1, 2], d_in=40, d_out=36, dtype=torch.float64, ref_rank=2)
    assert layer.capacity == 4  # min(36, max(1, 2 r_ref = 4))
    randomize(layer)
    x = torch.randn(4, 40, dtype=torch.float64)
    old = {n: t.detach().clone() for n, t in [*layer.named_parameters(recurse=False),
                                             *layer.named_buffers(recurse=False)]}
    old_ids = {n: id(t) for n, t in layer.named_parameters(recurse=False)}
    before, dW = layer(x), layer.delta_weight()
    layer.grow(3)  # r = 6 > 4: the capacity doubles to 8
    assert layer.capacity == 8 and layer.rank == 6 and layer.block_sizes == [1, 2, 3]
    assert [p.shape for p in layer.parameters() if p.requires_grad] == [(8, 40), (36, 8), (8, 8), (8, 8)]
    assert all(id(p) != old_ids[n] for n, p in layer.named_parameters(recurse=False))  # re-created
    assert torch.equal(layer.delta_weight(), dW)
    assert torch.allclose(layer(x), before, rtol=0, atol=1e-12)
    # Old values in the top-left corner (A's old rows, B's old columns, L, U and their masks), then the
    # new block in place, zeros past r = 6.
    assert torch.equal(layer.A[:3], old["A"][:3]) and torch.equal(layer.B[:, :3], old["B"][:, :3])
    for name in ("L", "U", "L_mask", "U_mask", "gram_mask"):
        assert torch.equal(getattr(layer, name)[:3, :3], old[name][:3, :3]), name
    assert torch.count_nonzero(layer.A[3:6]) == 3 * 40 and torch.count_nonzero(layer.B[:, 3:]) == 0
    assert torch.equal(layer.core()[3:, 3:], torch.eye(3, dtype=torch.float64))
    assert torch.count_nonzero(layer.core()[:3, 3:]) == 0 and torch.count_nonzero(layer.core()[3:, :3]) == 0
    assert_rest_is_zero(layer)
    assert layer.n_trainable == 6 * (40 + 36) + 2 * (1 * 1 + 2 * 3 + 3 * 6)
    assert int(torch.count_nonzero(layer.L_mask) + torch.count_nonzero(layer.U_mask)) == 2 * (1 + 6 + 18)
    layer.grow(3)  # r = 9 > 8: doubles again, to 16
    assert layer.capacity == 16 and torch.equal(layer.delta_weight(), dW)


def test_grow_past_the_cap_is_refused():
    layer = layer_with_blocks([3], d_in=5, d_out=4)
    with pytest.raises(ValueError, match="cap is min"):
        layer.grow(2)


def test_merge_and_unmerge():
    layer = layer_with_blocks([2, 2], d_in=6, d_out=5, dtype=torch.float64)
    randomize(layer)
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 6, dtype=torch.float64)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and torch.allclose(layer.base.weight, W0 + layer.delta_weight(), atol=0)
    assert torch.allclose(layer(x), unmerged, atol=1e-12)
    with pytest.raises(RuntimeError):
        layer.grow(1)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, W0, atol=1e-12)
    assert torch.allclose(layer(x), unmerged, atol=1e-12)


def test_every_factor_gets_a_gradient_after_one_step():
    torch.manual_seed(0)
    layer = TriAdaptLinear(nn.Linear(8, 8), rank=2)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(16, 8), torch.randn(16, 8)

    def step():
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
    step()
    # At injection only B can move: dW = s B C A with B = 0.
    assert layer.B.grad.abs().sum() > 0
    assert layer.A.grad.abs().sum() == 0 and layer.L.grad.abs().sum() == 0
    opt.step()
    step()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- inject

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(8, 8), "proj": nn.Linear(8, 8),
                                                     "out_proj": nn.Linear(8, 8)}) for _ in range(2)])
        self.norm = nn.LayerNorm(8)

    def forward(self, idx):
        h = self.emb(idx)
        for b in self.blocks:
            h = h + b["out_proj"](torch.relu(b["proj"](b["q"](h))))
        return self.norm(h).sum(-1)


def test_inject_replaces_only_named_linears_and_freezes_the_rest():
    torch.manual_seed(0)
    model = Toy()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = inject(model, ["q", "proj"], rank=2)
    assert list(layers) == ["blocks.0.q", "blocks.0.proj", "blocks.1.q", "blocks.1.proj"]
    assert isinstance(model.blocks[0]["q"], TriAdaptLinear) and isinstance(model.blocks[1]["out_proj"], nn.Linear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith((".A", ".B", ".L", ".U")) for n in trainable)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 10, (4, 5))
    for _ in range(3):
        opt.zero_grad()
        ((model(idx) - 1.0) ** 2).mean().backward()
        opt.step()
    after = dict(model.named_parameters())
    for n, p in adapter_before.items():
        assert not torch.equal(after[n], p), n
    for n, p in frozen.items():
        n2 = n.replace(".q.", ".q.base.").replace(".proj.", ".proj.base.").replace("out_proj.base.", "out_proj.")
        assert torch.equal(after[n2], p), n2


def test_inject_unknown_target_lists_the_valid_ones():
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D named fc1; those in this model: out_proj, proj, q"):
        inject(Toy(), ["q", "fc1"])


def test_lora_baseline_parameter_count():
    layer = LoRALinear(nn.Linear(16, 12), rank=8, alpha=16.0)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 8 * (16 + 12) == layer.n_trainable
    assert layer.scale == 2.0


# ----------------------------------------------------------------------------- orthogonal penalty

def test_orthogonal_penalty_known_values():
    a = layer_with_blocks([2], d_in=4, d_out=3)
    with torch.no_grad():
        a.A[:2].copy_(torch.eye(4)[:2])    # orthonormal rows (capacity 3: row 2 stays 0)
        a.B[:, :2].copy_(torch.eye(3)[:, :2])  # orthonormal columns
    assert orthogonal_penalty([a]).item() == 0.0
    b = layer_with_blocks([2], d_in=4, d_out=3)
    with torch.no_grad():
        b.A[:2].copy_(2 * torch.eye(4)[:2])  # A A^T - I = 3 I_2: norm 3 sqrt(2)
        b.B.zero_()                        # B^T B - I = -I_2: norm sqrt(2)
    # (1 / (2 * 2)) * (0 + 0 + 3 sqrt(2) + sqrt(2)) = sqrt(2)
    assert orthogonal_penalty({"a": a, "b": b}).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    # Past the rank nothing counts: the Gram matrices are masked to the r x r corner.
    with torch.no_grad():
        a.A[2] = 5.0
        a.B[:, 2] = 5.0
    assert orthogonal_penalty([a]).item() == 0.0


# ----------------------------------------------------------------------------- the allocator

def toy_layers(n=3, d=8, rank=1, ref_rank=2):
    torch.manual_seed(0)
    return {f"m{i}": TriAdaptLinear(nn.Linear(d, d), rank=rank, ref_rank=ref_rank) for i in range(n)}


def set_core_scale(layer, value):
    """Fill L with `value` and U with 0: N(C) = |value| for one block, and grows with |value| always."""
    with torch.no_grad():
        for P, Q in zip(layer.P, layer.Q):
            P.fill_(value)
            Q.zero_()


def test_allocator_defaults_and_initial_norms():
    layers = toy_layers(n=3, rank=1, ref_rank=4)
    alloc = RankAllocator(layers, total_steps=100)
    assert alloc.target_total_rank == 12 and alloc.rank_step == 2 and alloc.total_rank == 3
    assert alloc.prev == {"m0": 1.0, "m1": 1.0, "m2": 1.0}  # N(I_1) = 1 / sqrt(1)


def test_allocator_grows_the_top_scorer_at_the_right_steps():
    layers = toy_layers(n=3)
    alloc = RankAllocator(layers, total_steps=20, target_total_rank=6, schedule="topk", top_k=1,
                          warmup=4, interval=3, rank_step=1)
    set_core_scale(layers["m1"], 3.0)
    for t in range(1, 6):
        assert alloc.update_and_allocate(t) == [], t  # t <= warmup, or t % interval != 0
    assert alloc.scores == {}
    assert alloc.update_and_allocate(6) == ["m1"]
    assert alloc.scores == pytest.approx({"m0": 0.0, "m1": 2.0, "m2": 0.0})
    assert ranks(alloc.layers) == {"m0": 1, "m1": 2, "m2": 1}
    assert alloc.events == [(6, "m1", 1)]
    # m1's N dropped from 3 to sqrt(9 + 1) / 2 by its new identity block: a negative score next time.
    set_core_scale(layers["m2"], 2.0)
    assert alloc.update_and_allocate(7) == [] and alloc.update_and_allocate(9) == ["m2"]
    assert alloc.scores["m1"] == pytest.approx(math.sqrt(10) / 2 - 3.0)


def test_allocator_ties_all_grow_in_layer_order():
    layers = toy_layers(n=4)
    alloc = RankAllocator(layers, total_steps=10, target_total_rank=12, schedule="topk", top_k=1, rank_step=2)
    set_core_scale(layers["m3"], 2.0)
    set_core_scale(layers["m1"], 2.0)
    assert alloc.update_and_allocate(1) == ["m1", "m3"]
    assert ranks(alloc.layers) == {"m0": 1, "m1": 3, "m2": 1, "m3": 3}


def test_allocator_never_exceeds_the_budget_and_grows_partially():
    layers = toy_layers(n=3)
    alloc = RankAllocator(layers, total_steps=10, target_total_rank=6, schedule="topk", top_k=3, rank_step=2)
    for name, v in (("m0", 4.0), ("m1", 3.0), ("m2", 2.0)):
        set_core_scale(layers[name], v)
    # Deficit 3: m0 takes 2, m1 the last 1, m2 nothing.
    assert alloc.update_and_allocate(1) == ["m0", "m1"]
    assert ranks(alloc.layers) == {"m0": 3, "m1": 2, "m2": 1} and alloc.total_rank == 6
    assert alloc.update_and_allocate(2) == []  # budget reached: no round, scores untouched
    assert alloc.scores["m2"] == pytest.approx(1.0)


def test_allocator_linear_schedule_counts():
    layers = toy_layers(n=6, d=16)
    alloc = RankAllocator(layers, total_steps=110, target_total_rank=30, schedule="linear",
                          warmup=10, interval=10, rank_step=1)
    for i, name in enumerate(layers):
        set_core_scale(layers[name], 1.0 + i)  # distinct scores, m5 highest
    # t = 60: p = 0.5, D = 24, K = 12 clamped to the 6 matrices below their cap: all grow.
    assert alloc.update_and_allocate(60) == ["m5", "m4", "m3", "m2", "m1", "m0"]
    for i, name in enumerate(layers):
        set_core_scale(layers[name], 10.0 - i)  # m0 highest now
    # t = 30: p = 0.2, D = 18, K = floor(3.6) = 3.
    assert alloc.update_and_allocate(30) == ["m0", "m1", "m2"]


def test_allocator_skips_capped_matrices():
    layers = toy_layers(n=2)
    alloc = RankAllocator(layers, total_steps=10, target_total_rank=8, schedule="topk", top_k=1,
                          rank_step=1, max_rank=2)
    set_core_scale(layers["m0"], 5.0)
    assert alloc.update_and_allocate(1) == ["m0"]
    set_core_scale(layers["m0"], 50.0)  # highest score, but at its cap of 2
    assert alloc.update_and_allocate(2) == ["m1"]
    assert alloc.update_and_allocate(3) == []     # both capped: nothing can grow
    assert ranks(alloc.layers) == {"m0": 2, "m1": 2}


def test_a_growth_keeps_the_optimizers_and_ddps_tensors_and_new_entries_start_with_zero_moments(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    layers = toy_layers(n=2)  # d = 8, r_ref = 2: capacity 4
    model = nn.Sequential(*layers.values())
    trainable = lambda: [p for p in model.parameters() if p.requires_grad]
    ids = [id(p) for p in trainable()]
    opt = torch.optim.AdamW(trainable(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    alloc = RankAllocator(layers, total_steps=10, target_total_rank=4, schedule="topk", top_k=1, rank_step=1)
    x = torch.randn(16, 8)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DDP(model)  # one process: what DDP registered (its reducer's parameters) is what it holds

        def step():
            opt.zero_grad(set_to_none=True)
            ((ddp(x) - 1.0) ** 2).mean().backward()
            opt.step()
        step()
        m0 = layers["m0"]
        old_state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in (m0.A, m0.B, m0.L, m0.U)}
        set_core_scale(m0, 2.0)
        assert alloc.update_and_allocate(1) == ["m0"] and m0.block_sizes == [1, 1] and m0.capacity == 4
        # The same tensors everywhere: the model's, the optimizer's (one group) and DDP's.
        assert [id(p) for p in trainable()] == ids
        assert len(opt.param_groups) == 1 and [id(p) for p in opt.param_groups[0]["params"]] == ids
        assert [id(p) for p in ddp._module_parameters if p.requires_grad] == ids
        assert {id(p) for p in opt.state} == set(ids)
        # The growth did not touch the optimizer's state: the old entries keep their moments and step
        # count, and the newly active ones (A's row 1, B's column 1, P_1 = L[1, :2], Q_1 = U[:2, 1])
        # hold zero moments, as they never had a gradient.
        new = {m0.A: (slice(1, 2),), m0.B: (slice(None), slice(1, 2)), m0.L: (1, slice(0, 2)),
               m0.U: (slice(0, 2), 1)}
        for p, where in new.items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][key], old_state[p][key]), key
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.count_nonzero(opt.state[p][key][where]) == 0, key
        before = m0.B.detach().clone()
        step()
        assert torch.count_nonzero(m0.B[:, 1] - before[:, 1]) > 0  # new column of B: a gradient at once
        assert torch.count_nonzero(opt.state[m0.B]["exp_avg"][:, 1]) > 0
        # Entries past the rank and outside the blocks stay exactly zero (no gradient; weight decay keeps a
        # zero at zero).
        assert_rest_is_zero(m0)
        assert torch.count_nonzero(opt.state[m0.A]["exp_avg_sq"][2:]) == 0
    finally:
        dist.destroy_process_group()


def test_count_trainable_uses_the_closed_form():
    torch.manual_seed(0)
    model = Toy()
    layers = inject(model, ["q", "proj"], rank=1)
    layers["blocks.0.q"].grow(4)          # blocks (1, 4): 5 (8 + 8) + 2 (1 + 4 * 5) = 122
    model.norm.requires_grad_(True)       # 16 trainable numbers outside the adapters
    assert layers["blocks.0.q"].n_trainable == 122 and layers["blocks.0.proj"].n_trainable == 18  # 16 + 2
    assert count_trainable(model) == 122 + 3 * 18 + 16
    lora = Toy()
    inject(lora, ["q"], layer_cls=LoRALinear, rank=8)
    assert count_trainable(lora) == 2 * 8 * (8 + 8)


def test_allocator_state_round_trip_rebuilds_shapes_and_groups():
    layers = toy_layers(n=3)
    alloc = RankAllocator(layers, total_steps=10, target_total_rank=8, schedule="topk", top_k=2, rank_step=2)
    set_core_scale(layers["m2"], 2.0)
    set_core_scale(layers["m0"], 1.5)
    alloc.update_and_allocate(1)
    state = alloc.state_dict()
    fresh = toy_layers(n=3)
    params = [p for l in fresh.values() for p in l.parameters() if p.requires_grad]
    alloc2 = RankAllocator(fresh, total_steps=10, target_total_rank=8, schedule="topk", top_k=2, rank_step=2)
    alloc2.load_state_dict(state)
    assert ranks(alloc2.layers) == ranks(alloc.layers) == {"m0": 3, "m1": 1, "m2": 3}
    assert [l.block_sizes for l in fresh.values()] == [[1, 2], [1], [1, 2]]
    # The replay grows in place: an optimizer made before it still holds the layers' tensors.
    assert all(p is q for p, q in zip(params, [p for l in fresh.values() for p in l.parameters()
                                               if p.requires_grad], strict=True))
    for a, b in zip(layers.values(), fresh.values()):
        assert a.capacity == b.capacity == 4
        for name in ("L_mask", "U_mask", "gram_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert alloc2.prev == alloc.prev and alloc2.scores == alloc.scores and alloc2.events == alloc.events


def test_allocator_sync_decides_who_grows():
    layers = toy_layers(n=3)
    seen = []

    def sync(norms):  # e.g. rank 0's norms broadcast to every process; here: m2 always looks fastest
        seen.append(dict(norms))
        return {n: (10.0 * len(seen) if n == "m2" else v) for n, v in norms.items()}
    alloc = RankAllocator(layers, total_steps=10, target_total_rank=6, schedule="topk", top_k=1,
                          rank_step=1, sync=sync)
    assert seen == [{"m0": 1.0, "m1": 1.0, "m2": 1.0}] and alloc.prev["m2"] == 10.0  # at construction
    set_core_scale(layers["m0"], 5.0)  # the local norms say m0
    assert alloc.update_and_allocate(1) == ["m2"]
    assert len(seen) == 2 and seen[1]["m0"] == pytest.approx(5.0)
    assert alloc.scores == pytest.approx({"m0": 4.0, "m1": 0.0, "m2": 10.0})


def test_resume_after_growth_continues_bit_identically():
    """Train with growth, save (model, optimizer, allocator), rebuild fresh, replay, load: the same steps."""
    x, y = torch.randint(0, 10, (6, 5)), torch.randn(6, 5)

    def build():
        torch.manual_seed(0)
        model = Toy()
        layers = inject(model, ["q", "proj", "out_proj"], rank=1, ref_rank=3)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        alloc = RankAllocator(layers, total_steps=8, schedule="linear", warmup=1, interval=2, rank_step=2)
        return model, layers, opt, alloc

    def train(model, layers, opt, alloc, steps):
        losses = []
        for t in steps:
            loss = ((model(x) - y) ** 2).mean() + 0.1 * orthogonal_penalty(layers)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            alloc.update_and_allocate(t)
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    model, layers, opt, alloc = build()
    first = train(model, layers, opt, alloc, range(1, 5))
    saved = [copy.deepcopy(s) for s in (model.state_dict(), opt.state_dict(), alloc.state_dict())]
    rng = torch.get_rng_state()
    shapes = [[p.shape for p in g["params"]] for g in opt.param_groups]
    assert alloc.events  # grown before the checkpoint
    straight = train(model, layers, opt, alloc, range(5, 9))
    # every growth stayed within the capacity (6 = 2 r_ref): the optimizer made at injection holds the
    # model's tensors all along
    assert all(l.capacity == 6 for l in layers.values())
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"],
                                      [p for p in model.parameters() if p.requires_grad], strict=True))
    model2, layers2, opt2, alloc2 = build()
    alloc2.load_state_dict(saved[2])
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    torch.set_rng_state(rng)
    assert [[p.shape for p in g["params"]] for g in opt2.param_groups] == shapes
    resumed = train(model2, layers2, opt2, alloc2, range(5, 9))
    assert len(alloc.events) > len(saved[2]["events"])  # and grown after it
    assert first and resumed == straight and alloc2.events == alloc.events
    for (n, p), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, p2), n


def test_budget_below_initial_rank_is_refused():
    with pytest.raises(ValueError, match="below the initial total rank 6"):
        RankAllocator(toy_layers(n=3, rank=2), total_steps=10, target_total_rank=5)


# ----------------------------------------------------------------------------- torch.compile

def compile_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    layers = inject(model, ["0", "2"], rank=1, ref_rank=4)  # capacities 8 and 4
    x, y = torch.randn(16, 8), torch.randn(16, 4)

    def loss_fn(x, y):  # the fine-tune step's forward and loss
        return F.mse_loss(model(x), y) + 0.1 * orthogonal_penalty(layers)
    return model, layers, loss_fn, x, y


def test_the_fine_tune_step_has_no_graph_break():
    torch._dynamo.reset()
    try:
        _, _, loss_fn, x, y = compile_setup()
        explanation = torch._dynamo.explain(loss_fn)(x, y)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    finally:
        torch._dynamo.reset()


def test_growths_within_the_capacity_compile_once():
    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):  # counts what dynamo hands over; runs the captured graph as is
        compiles.append(gm)
        return gm.forward
    try:
        model, layers, loss_fn, x, y = compile_setup()
        step = torch.compile(loss_fn, backend=backend)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        alloc = RankAllocator(layers, total_steps=20, target_total_rank=8, schedule="topk", top_k=1, warmup=1,
                              interval=2, rank_step=1)
        for t in range(1, 13):
            with torch.no_grad():
                expected = loss_fn(x, y)  # eager, at the same parameters and masks
            loss = step(x, y)
            assert torch.allclose(loss, expected, rtol=1e-6, atol=0), t  # the graph reads the current masks
            loss.backward()
            opt.step()
            alloc.update_and_allocate(t)
            opt.zero_grad(set_to_none=True)
        assert len({t for t, _, _ in alloc.events}) >= 3 and alloc.total_rank == 8
        assert [l.capacity for l in layers.values()] == [8, 4]  # every growth in place
        assert len(compiles) == 1
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_matches_cpu():
    layer = layer_with_blocks([2, 3], d_in=16, d_out=12)
    randomize(layer)
    x = torch.randn(5, 16)
    expected = layer(x)
    layer.cuda()
    assert torch.allclose(layer(x.cuda()).cpu(), expected, atol=1e-5)
    layer.grow(2)
    assert all(t.is_cuda for t in [*layer.parameters(), *layer.buffers()])
    assert torch.allclose(layer(x.cuda()).cpu(), expected, atol=1e-5)  # growth keeps the function
