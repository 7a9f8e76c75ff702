"""The fused MLP neuron kernel against its reference, and the reference against a hand loop.

On a machine without CUDA the Triton path (forced with impl="triton") runs through Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1): shapes stay small and the blocks the launcher
picks on CPU (16 positions x up to 128 neurons) make each case span several position chunks and
neuron blocks, one of them partial. With CUDA the same tests run the compiled kernel.

Exactness is tested where it is owed: the override, pool_max and token counts are bit-identical
to the reference whenever the neuron tensor itself is exact (ungated relu of inputs >= 0);
activations and sums are compared within a few fp32 ulp; bf16 / fp16 follow FlashAttention's
rule (error against an fp64 oracle at most twice plain PyTorch's error in that dtype).
"""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from steer.kernels.fused_mlp import fused_mlp
from steer.kernels.fused_mlp_ref import ACTIVATIONS, fused_mlp_ref

# The interpreter evaluates exp() of large arguments in numpy, which warns on overflow to inf
# (the result, x / inf = 0, is the right one).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = ["silu", "gelu", "gelu_tanh", "relu"]
EPS32 = torch.finfo(torch.float32).eps


def kernel(*args, **kwargs):
    return fused_mlp(*args, impl="triton", **kwargs)


def randn(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)


def bools(*shape, gen, p):
    return (torch.rand(*shape, generator=gen) < p).to(DEVICE)


def random_override(M, gen, p=0.3):
    """mask [M], mul [M], add [M] with arbitrary (mul, add) pairs."""
    return bools(M, gen=gen, p=p), randn(M, gen=gen), randn(M, gen=gen)


def verb_override(verb, M, gen):
    """The four intervention verbs as (mul, add); 'mixed' draws one verb per neuron."""
    mask = bools(M, gen=gen, p=0.4)
    v = randn(M, gen=gen, scale=2.0)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    table = {"set": (zero, v), "scale": (v, zero), "add": (one, v), "zero": (zero, zero)}
    if verb != "mixed":
        return (mask, *table[verb])
    pick = torch.randint(0, 4, (M,), generator=gen).to(DEVICE)
    mul = torch.stack([m for m, _ in table.values()])[pick, torch.arange(M, device=DEVICE)]
    add = torch.stack([a for _, a in table.values()])[pick, torch.arange(M, device=DEVICE)]
    return mask, mul, add


def lengths_to_tokens(lengths, T, side="right"):
    """[B, T] bool: the real tokens of sentences of these lengths, padded on `side`."""
    pos = torch.arange(T, device=DEVICE)  # [T]
    lengths = torch.tensor(lengths, device=DEVICE)[:, None]  # [B, 1]
    return pos < lengths if side == "right" else pos >= T - lengths


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def masked_max(h, tokens):
    """[B, T, M], [B, T] -> [B, M] fp32: max of h over the tokens, -inf for none."""
    return h.float().masked_fill(~tokens[..., None], float("-inf")).amax(1)


def ulp_bound(value, up, gate):
    """Per-element scale of a few-ulp fp32 error: |value| + |act input x up| (cancellation in
    e.g. 0.5 x (1 + erf(x / sqrt 2)) makes errors relative to the inputs, not the result)."""
    inputs = up.float().abs() if gate is None else gate.float().abs() * up.float().abs()
    return value.float().abs() + inputs


# --- the reference: semantics checked by a hand-written loop ---------------------------------

def _act_scalar(act, x):
    if act == "silu":
        return x / (1.0 + math.exp(-x))
    if act == "gelu":
        return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
    if act == "gelu_tanh":
        return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return max(x, 0.0)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gated", [True, False])
def test_reference_matches_hand_loop(act, gated):
    gen = torch.Generator().manual_seed(0)
    B, T, M = 3, 4, 5
    up = torch.randn(B, T, M, generator=gen)
    gate = torch.randn(B, T, M, generator=gen) if gated else None
    mask = torch.tensor([True, False, True, True, False])
    mul = torch.tensor([0.0, 7.0, 2.0, 1.0, 3.0])  # set, (unmasked), scale, add, (unmasked)
    add = torch.tensor([1.5, 7.0, 0.0, -0.5, 3.0])
    steer = torch.rand(B, T, generator=gen) < 0.5
    pool = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)

    h, pool_max, pool_sum, _, _ = fused_mlp_ref(up, gate, act=act, override=(mask, mul, add),
                                          steer_tokens=steer, pool_tokens=pool)

    want_h = torch.zeros(B, T, M, dtype=torch.float64)
    want_max = torch.full((B, M), -math.inf, dtype=torch.float64)
    want_sum = torch.zeros(B, M, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for m in range(M):
                if gated:
                    v = _act_scalar(act, gate[b, t, m].item()) * up[b, t, m].item()
                else:
                    v = _act_scalar(act, up[b, t, m].item())
                if mask[m] and steer[b, t]:
                    v = v * mul[m].item() + add[m].item()
                want_h[b, t, m] = v
                if pool[b, t]:
                    want_max[b, m] = max(want_max[b, m].item(), v)
                    want_sum[b, m] += v
    assert h.dtype == torch.float32 and h.shape == (B, T, M) and h.is_contiguous()
    torch.testing.assert_close(h.double(), want_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pool_max.double(), want_max, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pool_sum.double(), want_sum, rtol=1e-6, atol=1e-6)
    assert (pool_max[1] == -math.inf).all() and (pool_sum[1] == 0).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_reference_compiles_fullgraph():
    gen = torch.Generator().manual_seed(1)
    B, T, M = 2, 6, 24
    up, gate = torch.randn(B, T, M, generator=gen), torch.randn(B, T, M, generator=gen)
    override = (torch.rand(M, generator=gen) < 0.5, torch.randn(M, generator=gen),
                torch.randn(M, generator=gen))
    steer = torch.rand(B, T, generator=gen) < 0.5
    pool = lengths_to_tokens([6, 3], T).cpu()
    eager = fused_mlp_ref(up, gate, act="gelu_tanh", override=override,
                          steer_tokens=steer, pool_tokens=pool)
    compiled = torch.compile(fused_mlp_ref, fullgraph=True)(
        up, gate, act="gelu_tanh", override=override, steer_tokens=steer, pool_tokens=pool)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=4 * EPS32, atol=4 * EPS32)


# --- kernel vs reference ------------------------------------------------------------------

# (B, T, M): on CPU 2 position chunks of 16 and 2 neuron blocks of 128, both partial; CUDA's
# blocks (32 x 128) need the longer shape for several partial chunks and blocks
EXACT_SHAPES = [(3, 21, 131)] + ([(3, 75, 300)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("verb", ["set", "scale", "add", "zero", "mixed"])
def test_override_pool_max_and_counts_exact(verb, dtype, shape):
    """Ungated relu of inputs >= 0 is the identity, so the neuron tensor is exact and the
    override (one rounding to dtype), pool_max and the counts must be bit-identical."""
    gen = torch.Generator().manual_seed(2)
    B, T, M = shape
    up = randn(B, T, M, gen=gen).abs().to(dtype)
    override = verb_override(verb, M, gen)
    steer = bools(B, T, gen=gen, p=0.5)
    pool = lengths_to_tokens([T, 7, 0], T)  # row 2 has no token
    kwargs = dict(act="relu", override=override, steer_tokens=steer, pool_tokens=pool)

    h, pool_max, pool_sum, _, _ = kernel(up, **kwargs)
    ref_h, ref_max, ref_sum, _, _ = fused_mlp_ref(up, **kwargs)
    assert h.dtype == dtype and h.shape == (B, T, M) and h.is_contiguous()
    assert pool_max.dtype == pool_sum.dtype == torch.float32
    assert_same(h, ref_h)
    assert_same(pool_max, ref_max)
    assert_same(pool_max, masked_max(h, pool))  # pooled values are the values as written
    assert (pool_max[2] == -math.inf).all() and (pool_sum[2] == 0).all()
    # sums differ by summation order only: at most T ulp of the sum of magnitudes (overrides may be < 0)
    magnitude = h.float().abs().mul(pool[..., None]).sum(1)  # [B, M]
    assert ((pool_sum - ref_sum).abs() <= T * EPS32 * magnitude).all()

    # counts: a neuron tensor of ones sums to the number of pooled tokens, exactly
    _, _, counts, _, _ = kernel(torch.ones_like(up), act="relu", pool_tokens=pool)
    assert_same(counts, pool.sum(1, dtype=torch.float32)[:, None].expand(B, M))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gated", [True, False])
def test_activations_fp32_within_few_ulp(act, gated):
    gen = torch.Generator().manual_seed(3)
    B, T, M = 3, 20, 200
    up = randn(B, T, M, gen=gen, scale=3.0)
    gate = randn(B, T, M, gen=gen, scale=3.0) if gated else None
    pool = bools(B, T, gen=gen, p=0.7)
    kwargs = dict(act=act, override=random_override(M, gen),
                  steer_tokens=bools(B, T, gen=gen, p=0.5), pool_tokens=pool)

    h, pool_max, pool_sum, _, _ = kernel(up, gate, **kwargs)
    ref_h, ref_max, ref_sum, _, _ = fused_mlp_ref(up, gate, **kwargs)

    bound = ulp_bound(ref_h, up, gate)  # [B, T, M]
    assert ((h - ref_h).abs() <= 4 * EPS32 * bound).all()
    assert ((pool_max - ref_max).abs() <= 4 * EPS32 * masked_max(bound, pool)).all()
    pooled_bound = (bound * pool[..., None]).sum(1)  # [B, M]
    assert ((pool_sum - ref_sum).abs() <= 8 * EPS32 * pooled_bound).all()
    counts = pool.sum(1, keepdim=True)  # [B, 1]
    assert ((pool_sum / counts - ref_sum / counts).abs() <= 8 * EPS32 * pooled_bound / counts).all()


def _oracle_and_lowp(up, gate, act, override, steer, pool):
    """(oracle, plain torch in up's dtype): each as (h, pool_max, pool_sum)."""
    mask, mul, add = override
    steered = steer[..., None] & mask  # [B, T, M]
    fn = ACTIVATIONS[act]

    x64 = fn(gate.double()) * up.double() if gate is not None else fn(up.double())
    x64 = torch.where(steered, x64 * mul.double() + add.double(), x64)
    lowp = fn(gate) * up if gate is not None else fn(up)
    lowp = torch.where(steered, lowp * mul.to(up.dtype) + add.to(up.dtype), lowp)

    keep = pool[..., None]  # [B, T, 1]
    return [(h, h.masked_fill(~keep, -math.inf).amax(1), h.masked_fill(~keep, 0).sum(1))
            for h in (x64, lowp)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act,gated", [(a, True) for a in ACTS] + [("gelu", False)])
def test_low_precision_error_at_most_twice_torch(dtype, act, gated):
    gen = torch.Generator().manual_seed(4)
    B, T, M = 2, 32, 128
    up = randn(B, T, M, gen=gen, scale=2.0).to(dtype)
    gate = randn(B, T, M, gen=gen, scale=2.0).to(dtype) if gated else None
    override = random_override(M, gen)
    steer = bools(B, T, gen=gen, p=0.5)
    pool = lengths_to_tokens([32, 19], T)

    out = kernel(up, gate, act=act, override=override, steer_tokens=steer, pool_tokens=pool)
    oracle, lowp = _oracle_and_lowp(up, gate, act, override, steer, pool)
    for name, k, o, t in zip(("h", "pool_max", "pool_sum"), out, oracle, lowp):
        err_kernel = (k.double() - o).abs().max().item()
        err_torch = (t.double() - o).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-6, (name, err_kernel, err_torch)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_padding_side_and_batch_do_not_change_results(act):
    """Ragged sentences padded on the right, on the left, and alone (batch 1, no padding): same
    values at real tokens, same pooled responses; padding holds large values that must not leak."""
    gen = torch.Generator().manual_seed(5)
    lengths, T, M = [5, 20, 1, 13], 20, 100
    sentences = [(randn(L, M, gen=gen), randn(L, M, gen=gen)) for L in lengths]  # (up, gate)
    override = random_override(M, gen)

    def padded(side):
        up = torch.full((len(lengths), T, M), 50.0, device=DEVICE)
        gate = torch.full((len(lengths), T, M), 50.0, device=DEVICE)
        for b, (u, g) in enumerate(sentences):
            span = slice(0, len(u)) if side == "right" else slice(T - len(u), T)
            up[b, span], gate[b, span] = u, g
        tokens = lengths_to_tokens(lengths, T, side)
        return kernel(up, gate, act=act, override=override, steer_tokens=tokens, pool_tokens=tokens)

    right, left = padded("right"), padded("left")
    for b, (u, g) in enumerate(sentences):
        L = len(u)
        alone = kernel(u[None], g[None], act=act, override=override,
                       pool_tokens=torch.ones(1, L, dtype=torch.bool, device=DEVICE))
        assert_same(right[0][b, :L], alone[0][0])
        assert_same(left[0][b, T - L:], alone[0][0])
        for pooled in (right, left):
            assert_same(pooled[1][b], alone[1][0])
        assert_same(right[2][b], alone[2][0])  # same positions, same chunks: same order
        bound = alone[0][0].abs().sum(0)  # [M]
        assert ((left[2][b] - alone[2][0]).abs() <= L * EPS32 * bound).all()


def test_steer_last_token_only():
    gen = torch.Generator().manual_seed(6)
    lengths, T, M = [9, 3, 17], 17, 64
    up, gate = randn(3, T, M, gen=gen), randn(3, T, M, gen=gen)
    real = lengths_to_tokens(lengths, T)
    last = torch.zeros_like(real)
    last[torch.arange(3), torch.tensor(lengths) - 1] = True
    mask, mul, add = verb_override("set", M, gen)
    mask[:5] = True

    plain = kernel(up, gate, act="silu", pool_tokens=real)
    steered = kernel(up, gate, act="silu", override=(mask, mul, add),
                     steer_tokens=last, pool_tokens=real)
    changed = steered[0] != plain[0]  # [B, T, M]
    assert changed.any(dim=(0, 1)).logical_and(~mask).sum() == 0
    assert (changed.any(dim=2) <= last).all()
    assert_same(steered[0][last][:, mask], add[mask].expand(3, -1))
    assert_same(steered[0][~last], plain[0][~last])


def test_empty_override_mask_leaves_everything_unchanged():
    gen = torch.Generator().manual_seed(7)
    B, T, M = 2, 18, 70
    up, gate = randn(B, T, M, gen=gen), randn(B, T, M, gen=gen)
    pool = bools(B, T, gen=gen, p=0.6)
    _, mul, add = random_override(M, gen)
    mask = torch.zeros(M, dtype=torch.bool, device=DEVICE)
    plain = kernel(up, gate, act="gelu", pool_tokens=pool)
    masked = kernel(up, gate, act="gelu", override=(mask, mul, add), pool_tokens=pool)
    for p, m in zip(plain, masked):
        assert_same(m, p)


def test_strided_inputs_give_the_same_bits_as_contiguous():
    """Phi-3's merged gate_up output chunked in two, a [B, M, T] transposed layout, and
    strided token masks read through their strides."""
    gen = torch.Generator().manual_seed(8)
    B, T, M = 2, 19, 96
    gate, up = randn(B, T, 2 * M, gen=gen).chunk(2, dim=-1)  # strides (2TM, 2M, 1)
    assert not gate.is_contiguous()
    up_t = randn(B, M, T, gen=gen).transpose(1, 2)  # [B, T, M] with strides (MT, 1, T)
    steer = bools(B, 2 * T, gen=gen, p=0.5)[:, ::2]  # [B, T], stride 2
    pool = bools(B, 2 * T, gen=gen, p=0.7)[:, 1::2]
    kwargs = dict(act="silu", override=random_override(M, gen), steer_tokens=steer,
                  pool_tokens=pool)
    for u, g in ((up, gate), (up_t, gate), (up_t, None)):
        strided = kernel(u, g, **kwargs)
        dense = kernel(u.contiguous(), None if g is None else g.contiguous(),
                       **{**kwargs, "steer_tokens": steer.contiguous(),
                          "pool_tokens": pool.contiguous()})
        for s, d in zip(strided, dense):
            assert_same(s, d)


def test_without_pool_tokens_and_steer_everywhere():
    gen = torch.Generator().manual_seed(9)
    B, T, M = 1, 5, 33
    up = randn(B, T, M, gen=gen).abs()
    mask, mul, add = verb_override("scale", M, gen)
    h, pool_max, pool_sum, act_pos, act_sum = kernel(up, act="relu", override=(mask, mul, add))
    assert pool_max is None and pool_sum is None and act_pos is None and act_sum is None
    assert_same(h, torch.where(mask, up * mul, up))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_only_the_reductions_asked_for_are_returned(impl):
    gen = torch.Generator().manual_seed(10)
    up, gate = randn(2, 6, 40, gen=gen), randn(2, 6, 40, gen=gen)
    pool = bools(2, 6, gen=gen, p=0.7)
    both = fused_mlp(up, gate, act="silu", pool_tokens=pool, impl=impl)
    only_max = fused_mlp(up, gate, act="silu", pool_tokens=pool, reductions=("max",), impl=impl)
    only_sum = fused_mlp(up, gate, act="silu", pool_tokens=pool, reductions=("sum",), impl=impl)
    assert only_max.pool_sum is None and only_sum.pool_max is None
    assert_same(only_max.pool_max, both.pool_max)
    assert_same(only_sum.pool_sum, both.pool_sum)
    with pytest.raises(ValueError, match="reductions must be among"):
        fused_mlp(up, gate, act="silu", pool_tokens=pool, reductions=("mean",), impl=impl)


# --- the op: fake implementation, registration, dispatch ----------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_pool", [True, False])
def test_fake_implementation_shapes(dtype, with_pool):
    B, T, M = 2, 7, 48
    up, gate = torch.randn(B, T, M).to(dtype), torch.randn(B, T, M).to(dtype)
    pool = torch.ones(B, T, dtype=torch.bool)
    override = (torch.ones(M, dtype=torch.bool), torch.ones(M), torch.zeros(M))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (up, gate, pool, *override)]
        h, pool_max, pool_sum, act_pos, act_sum = kernel(fake[0], fake[1], act="silu", override=tuple(fake[3:]),
                                                         pool_tokens=fake[2] if with_pool else None,
                                                         act_stats=with_pool)
    assert (h.shape, h.dtype) == ((B, T, M), dtype)
    if with_pool:
        assert pool_max.shape == pool_sum.shape == act_pos.shape == act_sum.shape == (B, M)
        assert pool_max.dtype == pool_sum.dtype == act_pos.dtype == act_sum.dtype == torch.float32
    else:
        assert pool_max is None and pool_sum is None and act_pos is None and act_sum is None


def test_opcheck():
    gen = torch.Generator().manual_seed(10)
    B, T, M = 2, 6, 40
    up, gate = randn(B, T, M, gen=gen), randn(B, T, M, gen=gen)
    mask, mul, add = random_override(M, gen)
    steer, pool = bools(B, T, gen=gen, p=0.5), bools(B, T, gen=gen, p=0.7)
    # The AOT-dispatch checks trace the launcher with functional tensors, which needs the real
    # (CUDA) Triton: the interpreter runs kernels on data only.
    utils = ["test_schema", "test_faketensor", "test_autograd_registration"]
    if DEVICE == "cuda":
        utils.append("test_aot_dispatch_dynamic")
    tables = tuple(torch.stack([x, x.flip(0), torch.zeros_like(x)]) for x in (mask, mul, add))  # [3, M]
    rows = torch.tensor([2, 0], device=DEVICE)
    for args in ((up, gate, "silu", mask, mul, add, steer, pool, None, False, False),
                 (up, gate, "silu", *tables, steer, pool, rows, True, True),
                 (up, None, "gelu", None, None, None, None, None, None, False, False)):
        torch.library.opcheck(torch.ops.steer.fused_mlp.default, args, test_utils=utils)


def test_dispatch():
    gen = torch.Generator().manual_seed(11)
    up, gate = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
    pool = torch.ones(2, 4, dtype=torch.bool)
    ref = fused_mlp_ref(up, gate, act="gelu", pool_tokens=pool, act_stats=True)
    for impl in ("auto", "torch"):  # CPU tensors take the reference
        for a, b in zip(fused_mlp(up, gate, act="gelu", pool_tokens=pool, act_stats=True, impl=impl), ref):
            assert_same(a, b)
    with pytest.raises(ValueError, match="impl"):
        fused_mlp(up, gate, act="gelu", impl="cuda")
    with pytest.raises(ValueError, match="act"):
        fused_mlp(up, gate, act="swish")
    with pytest.raises(ValueError, match="shape"):
        fused_mlp(up, gate[:, :3], act="gelu")


def test_triton_path_compiles_fullgraph():
    """The dispatcher reaches the Triton op inside a graph (no import machinery while tracing):
    on CUDA with real Triton, elsewhere under the interpreter."""
    from steer.kernels.dispatch import triton_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_module("fused_mlp_triton")  # as steer.patch does before any compile
    f = torch.compile(lambda up, gate: fused_mlp(up, gate, act="silu", impl="triton")[0],
                      fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    up, gate = (torch.randn(2, 3, 8, generator=g).to(device) for _ in range(2))
    torch.testing.assert_close(f(up, gate), fused_mlp(up, gate, act="silu", impl="torch")[0])


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("steer_all", [True, False])
def test_per_row_tables_equal_each_row_alone(gated, steer_all):
    """override_rows: row b takes row rows[b] of [R, M] tables; each row of a mixed batch equals
    that row run alone with its own [M] override (kernel and reference; within fp32 rounding: a
    vectorised activation may round a row differently in another batch shape), and a row whose
    table row masks nothing equals, bit for bit, the same batch run without any override."""
    gen = torch.Generator().manual_seed(12)
    B, T, M, R = 4, 21, 150, 3
    up = randn(B, T, M, gen=gen)
    gate = randn(B, T, M, gen=gen) if gated else None
    tables = [random_override(M, gen) for _ in range(R - 1)]
    none = (torch.zeros(M, dtype=torch.bool, device=DEVICE), torch.ones(M, device=DEVICE), torch.zeros(M, device=DEVICE))
    mask, mul, add = (torch.stack(x) for x in zip(*tables, none))  # [R, M]; row R-1 steers nothing
    rows = torch.tensor([1, 2, 0, 1], device=DEVICE)
    steer = None if steer_all else bools(B, T, gen=gen, p=0.5)
    pool = bools(B, T, gen=gen, p=0.8)
    for run in (kernel, fused_mlp_ref):
        h, pmax, psum, _, _ = run(up, gate, act="silu", override=(mask, mul, add), steer_tokens=steer,
                                  pool_tokens=pool, override_rows=rows)
        for b, r in enumerate(rows.tolist()):
            one = lambda x: None if x is None else x[b:b + 1]  # noqa: E731
            alone = run(one(up), one(gate), act="silu", pool_tokens=one(pool), steer_tokens=one(steer),
                        override=None if r == R - 1 else (mask[r], mul[r], add[r]))
            torch.testing.assert_close(h[b:b + 1], alone[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(pmax[b:b + 1], alone[1], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(psum[b:b + 1], alone[2], rtol=1e-6, atol=1e-5)
        plain = run(up, gate, act="silu", pool_tokens=pool)
        assert_same(h[1], plain[0][1])  # rows[1] is the table row that steers nothing
        assert_same(pmax[1], plain[1][1])
    ref = fused_mlp_ref(up, gate, act="silu", override=(mask, mul, add), steer_tokens=steer,
                        override_rows=rows)[0]
    torch.testing.assert_close(kernel(up, gate, act="silu", override=(mask, mul, add), steer_tokens=steer,
                                      override_rows=rows)[0], ref, rtol=2e-6, atol=2e-6)


# --- the activation site and LAPE's statistics -------------------------------------------------

@pytest.mark.parametrize("run", ["kernel", "reference"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("per_row", [False, True])
def test_activation_site_and_stats_match_hand_loop(run, gated, per_row):
    """override_site="activation" overrides act(gate) before `* up` (ungated: the activation is
    the neuron); act_pos / act_sum count and sum the activation as used, over the pooled tokens.
    Oracle: plain Python loops over rows, positions and neurons."""
    fn = kernel if run == "kernel" else fused_mlp_ref
    gen = torch.Generator().manual_seed(21)
    B, T, M = 3, 19, 37
    up = randn(B, T, M, gen=gen)
    gate = randn(B, T, M, gen=gen) if gated else None
    mask, mul, add = random_override(M, gen)
    rows = None
    if per_row:
        mask, mul, add = (torch.stack([x, x.roll(5)]) for x in (mask, mul, add))  # [R, M]
        rows = torch.tensor([1, 0, 1], device=DEVICE)
    steer, pool = bools(B, T, gen=gen, p=0.6), bools(B, T, gen=gen, p=0.7)
    out = fn(up, gate, act="silu", override=(mask, mul, add), steer_tokens=steer, pool_tokens=pool,
             override_rows=rows, override_site="activation", act_stats=True)
    u = up.double().cpu()
    g = (gate if gated else up).double().cpu()
    want_h = torch.empty(B, T, M, dtype=torch.float64)
    want_pos = torch.zeros(B, M, dtype=torch.float64)
    want_sum = torch.zeros(B, M, dtype=torch.float64)
    for b in range(B):
        r = b if rows is None else int(rows[b])
        mk, ml, ad = ((mask, mul, add) if rows is None else (mask[r], mul[r], add[r]))
        for t in range(T):
            for m in range(M):
                a = float(g[b, t, m]) / (1 + math.exp(-float(g[b, t, m])))
                if bool(steer[b, t]) and bool(mk[m]):
                    a = a * float(ml[m]) + float(ad[m])
                want_h[b, t, m] = a * float(u[b, t, m]) if gated else a
                if bool(pool[b, t]):
                    want_pos[b, m] += a > 0
                    want_sum[b, m] += a
    torch.testing.assert_close(out.h.double().cpu(), want_h, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.act_pos.double().cpu(), want_pos)
    torch.testing.assert_close(out.act_sum.double().cpu(), want_sum, rtol=1e-5, atol=1e-5)


def test_zeroing_the_activation_zeroes_the_neuron_and_setting_it_scales_up():
    """Zeroing the activation of a gated MLP zeroes the neuron (0 * up); setting it to v makes
    the neuron v * up, which no neuron-site override can express for every up."""
    gen = torch.Generator().manual_seed(22)
    up, gate = randn(2, 6, 24, gen=gen), randn(2, 6, 24, gen=gen)
    mask = torch.zeros(24, dtype=torch.bool, device=DEVICE)
    mask[::3] = True
    zero = (mask, torch.zeros(24, device=DEVICE), torch.zeros(24, device=DEVICE))
    a = kernel(up, gate, act="gelu_tanh", override=zero, override_site="activation").h
    n = kernel(up, gate, act="gelu_tanh", override=zero).h
    assert_same(a, n)
    setv = (mask, torch.zeros(24, device=DEVICE), torch.full((24,), 0.5, device=DEVICE))
    h = kernel(up, gate, act="gelu_tanh", override=setv, override_site="activation").h
    assert_same(h[..., mask], (0.5 * up[..., mask].float()).to(h.dtype))
    with pytest.raises(ValueError, match="override_site"):
        kernel(up, gate, act="silu", override=zero, override_site="residual")
    with pytest.raises(ValueError, match="pool_tokens"):
        kernel(up, gate, act="silu", act_stats=True)


def _hand_pools(x: torch.Tensor, tokens: torch.Tensor):
    """max (NaN wins), sum and count of positives over each row's true positions, neuron by
    neuron in Python floats -> three [B, M] float64."""
    B, T, M = x.shape
    out = torch.zeros(3, B, M, dtype=torch.float64)
    for b in range(B):
        for m in range(M):
            vals = [float(x[b, t, m]) for t in range(T) if tokens[b, t]]
            out[0, b, m] = math.nan if any(math.isnan(v) for v in vals) else max(vals, default=-math.inf)
            out[1, b, m] = sum(vals)
            out[2, b, m] = sum(v > 0 for v in vals)
    return out


MASKS = {  # name: (tokens [B=4, T=7], its token_core (lo, c0, c1, hi) or None)
    "right padding, BOS skipped": ([[0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0],
                                    [0, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]], (1, 1, 2, 7)),
    "left padding": ([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1],
                      [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], (0, 5, 7, 7)),
    "equal lengths": ([[0, 1, 1, 1, 1, 0, 0]] * 4, (1, 1, 5, 5)),
    "all pooled": ([[1] * 7] * 4, (0, 0, 7, 7)),
    "both edges ragged": ([[1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0],
                           [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]], (0, 2, 4, 7)),
    "a core split by a gap": ([[1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1],
                               [1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], (0, 0, 2, 7)),
    "one position": ([[1]] * 4, (0, 0, 1, 1)),
    "a gap in a row": ([[0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0],
                        [0, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]], (1, 1, 2, 7)),
    "a row without tokens": ([[0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0],
                              [0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], None),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [True, False])
def test_pooling_core_and_masked_equal_a_hand_loop(mask_name, dtype, split, monkeypatch):
    """The reductions (the core as a view plus masked ragged edges; split False: the whole tensor
    masked, as on GPU and under compile) against a hand loop, with NaN and inf at positions left
    out (never counted) and NaN / inf at a pooled position (propagated): max and positive counts
    exact, sums within a few ulp."""
    from steer.kernels import fused_mlp_ref as ref

    rows, core = MASKS[mask_name]
    tokens = torch.tensor(rows).bool()
    assert ref.token_core(tokens) == core
    if not split:
        monkeypatch.setattr(ref, "token_core", lambda tokens: None)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, tokens.shape[1], 33, generator=gen) * 3).to(dtype)
    n_out = int((~tokens).sum())
    x[~tokens] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype).repeat(n_out)[:n_out, None]
    first = tokens.float().argmax(1)
    x[0, first[0], 5], x[3, first[3], 6] = math.nan, math.inf  # at pooled positions: propagated
    mx, sm, pos = _hand_pools(x, tokens)
    got_pos, got_sum = ref.activation_stats(x, tokens)
    torch.testing.assert_close(ref.pool_max(x, tokens).double(), mx, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ref.pool_sum(x, tokens).double(), sm, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got_sum.double(), sm, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(got_pos.double(), pos)


def test_token_core_only_eagerly_on_cpu():
    """Under torch.compile the masked form is traced (no host reads of the mask); the compiled
    pooling equals the eager split pooling."""
    from steer.kernels.fused_mlp_ref import pool_max, pool_sum, token_core

    tokens = torch.tensor(MASKS["right padding, BOS skipped"][0]).bool()
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(0))
    assert token_core(tokens) is not None and token_core(tokens[:0]) is None
    assert token_core(tokens.to("meta")) is None  # other devices: no host reads
    compiled = torch.compile(lambda h, t: (pool_max(h, t), pool_sum(h, t)), fullgraph=True, backend="eager")
    cmax, csum = compiled(x, tokens)
    assert torch.equal(cmax, pool_max(x, tokens))
    torch.testing.assert_close(csum, pool_sum(x, tokens), rtol=1e-6, atol=1e-6)
