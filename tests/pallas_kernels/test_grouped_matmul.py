"""The grouped matmul kernels (interpret mode) against the masked-dense reference, forward and both gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import Tiling, TilingPlan, grouped_matmul, grouped_matmul_reference
from pallas_kernels.grouped_matmul.kernel import SCHEDULES, group_bounds, grouped_matmul_kernel

SMALL = Tiling(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
# M, K, N chosen so that no dimension is a multiple of its tile.
M, K, N = 83, 40, 37


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def random_operands(seed, group_sizes, dtype, m=M, k=K, n=N):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(keys[1], (len(group_sizes), k, n), jnp.float32).astype(dtype)
    d_out = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, jnp.asarray(group_sizes, jnp.int32), d_out


def random_uneven_sizes(seed, num_groups, total):
    """Sizes >= 0 summing to `total`, with a few empty groups, drawn from the seed."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, total + 1, num_groups - 1))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)


def forward_and_grads(impl, lhs, rhs, group_sizes, d_out, **kwargs):
    out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, group_sizes, impl=impl, **kwargs), lhs, rhs)
    return (out, *vjp(d_out))


def assert_matches_reference(lhs, rhs, group_sizes, d_out, tol, **kwargs):
    got = forward_and_grads("pallas", lhs, rhs, group_sizes, d_out, interpret=True, **kwargs)
    want = forward_and_grads("reference", lhs, rhs, group_sizes, d_out)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name} has non-finite values (unwritten?)"
        assert rel_err(g, w) < tol, (name, rel_err(g, w), np.asarray(group_sizes))
    return got


CASES = {
    "random_uneven": random_uneven_sizes(1, 6, M),
    "empty_first_middle_last": np.array([0, 20, 0, 0, 41, 0, 22, 0], np.int32),
    "one_group_holds_all": np.array([0, 0, M, 0], np.int32),
    "padding_rows": np.array([7, 0, 30, 11, 2], np.int32),  # sums to 50 < M
    "many_groups_per_tile": np.array([3, 1, 0, 5, 2, 9, 0, 4, 30, 6, 0, 1], np.int32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_forward_and_grads_match_reference(case):
    sizes = CASES[case]
    lhs, rhs, group_sizes, d_out = random_operands(sorted(CASES).index(case), sizes, jnp.float32)
    out, d_lhs, d_rhs = assert_matches_reference(lhs, rhs, group_sizes, d_out, 1e-5, tiling=SMALL)
    total = int(sizes.sum())
    np.testing.assert_array_equal(np.asarray(out[total:]), 0.0)  # padding rows: zero output ...
    np.testing.assert_array_equal(np.asarray(d_lhs[total:]), 0.0)  # ... and zero gradient
    for e in np.flatnonzero(sizes == 0):
        np.testing.assert_array_equal(np.asarray(d_rhs[e]), 0.0)  # empty groups: zero d_rhs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_forward_and_grads_match_reference(dtype):
    sizes = random_uneven_sizes(7, 5, M - 9)
    lhs, rhs, group_sizes, d_out = random_operands(11, sizes, dtype)
    assert_matches_reference(lhs, rhs, group_sizes, d_out, 1e-2, tiling=SMALL)


def test_separate_tiling_per_kernel_and_tiles_larger_than_the_problem():
    plan = TilingPlan(forward=Tiling(32, 16, 16, 4, 2), d_lhs=Tiling(16, 32, 16, 4, 2), d_rhs=Tiling(64, 128, 32, 4, 2))
    sizes = random_uneven_sizes(3, 4, M)
    lhs, rhs, group_sizes, d_out = random_operands(5, sizes, jnp.float32)
    assert_matches_reference(lhs, rhs, group_sizes, d_out, 1e-5, tiling=plan)


def test_default_tiling_under_jit_with_traced_group_sizes():
    sizes = random_uneven_sizes(9, 3, 150)
    lhs, rhs, group_sizes, _ = random_operands(9, sizes, jnp.bfloat16, m=161, k=64, n=48)
    run = jax.jit(lambda a, b, g: grouped_matmul(a, b, g, impl="pallas", interpret=True))
    got = run(lhs, rhs, group_sizes)
    assert rel_err(got, grouped_matmul_reference(lhs, rhs, group_sizes)) < 1e-2


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_matches_reference(split_k):
    """K = 40 in steps of 16 is 3 steps: split 2 gives parts of 2 and 1 steps, split 4 leaves one part empty.
    Empty groups and padding rows included; d_lhs runs the same split kernel."""
    sizes = CASES["many_groups_per_tile"]
    lhs, rhs, group_sizes, d_out = random_operands(17, sizes, jnp.float32, m=int(sizes.sum()) + 5)
    tiling = Tiling(16, 16, 16, 4, 2, split_k=split_k)
    out, d_lhs, _ = assert_matches_reference(lhs, rhs, group_sizes, d_out, 1e-5, tiling=tiling)
    np.testing.assert_array_equal(np.asarray(out[int(sizes.sum()):]), 0.0)
    np.testing.assert_array_equal(np.asarray(d_lhs[int(sizes.sum()):]), 0.0)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        Tiling(split_k=0)


def test_default_tiling_narrows_for_few_rows_per_group():
    from pallas_kernels.grouped_matmul.ops import SMALL_ROWS_PER_GROUP, default_tiling
    wide, narrow = default_tiling(jnp.bfloat16), default_tiling(jnp.bfloat16, 2, 32)  # batch-1 decode: 2 of 32
    assert narrow.forward.block_m < wide.forward.block_m and narrow.d_lhs == narrow.forward
    assert narrow.d_rhs == wide.d_rhs
    assert default_tiling(jnp.bfloat16, SMALL_ROWS_PER_GROUP * 8, 8) == narrow
    assert default_tiling(jnp.bfloat16, SMALL_ROWS_PER_GROUP * 8 + 1, 8) == wide
    assert default_tiling(jnp.float32, 2, 32) == default_tiling(jnp.float32)


def test_default_tiling_on_hopper_takes_mosaic_where_its_tiles_divide():
    """Each kernel separately: M1's widths divide every GEMM; research width's N = 1408 is no multiple of the
    256-wide output tile of the forward and d_rhs, but d_lhs (reduce over N, out K wide) divides."""
    from pallas_kernels.grouped_matmul.mosaic_common import MosaicTiling
    from pallas_kernels.grouped_matmul.ops import default_tiling
    wide = default_tiling(jnp.bfloat16)
    m1 = default_tiling(jnp.bfloat16, 16384, 32, 6144, 9216, hopper=True)
    assert all(isinstance(t, MosaicTiling) for t in m1)
    research = default_tiling(jnp.float16, 32768, 32, 2048, 1408, hopper=True)
    assert research.forward == wide.forward and research.d_rhs == wide.d_rhs
    assert isinstance(research.d_lhs, MosaicTiling)
    assert default_tiling(jnp.bfloat16, 16384, 32, 6144, 9216, hopper=False) == wide
    assert default_tiling(jnp.bfloat16, 16384, 32, 6144, 9216) == wide  # this machine: no Hopper GPU
    assert default_tiling(jnp.bfloat16, 2, 32, 6144, 9216, hopper=True) == default_tiling(jnp.bfloat16, 2, 32)
    assert default_tiling(jnp.float32, 16384, 32, 6144, 9216, hopper=True) == default_tiling(jnp.float32)


def test_mosaic_by_default_switch(monkeypatch):
    """A call with no tiling takes the Mosaic choice only with MOSAIC_BY_DEFAULT, on a Hopper GPU, not interpreted."""
    from pallas_kernels.grouped_matmul import ops
    lhs, rhs = jnp.zeros((16384, 6144), jnp.bfloat16), jnp.zeros((32, 6144, 9216), jnp.bfloat16)
    monkeypatch.setattr(ops, "on_hopper", lambda: True)
    assert ops._as_plan(None, lhs, rhs, interpret=False) == ops.default_tiling(jnp.bfloat16)  # off by default
    monkeypatch.setattr(ops, "MOSAIC_BY_DEFAULT", True)
    assert ops._as_plan(None, lhs, rhs, interpret=False) == ops.default_tiling(jnp.bfloat16, 16384, 32, 6144, 9216,
                                                                                 hopper=True)
    assert ops._as_plan(None, lhs, rhs, interpret=True) == ops.default_tiling(jnp.bfloat16)
    monkeypatch.setattr(ops, "on_hopper", lambda: False)
    assert ops._as_plan(None, lhs, rhs, interpret=False) == ops.default_tiling(jnp.bfloat16)


def test_decode_sized_default_tiling_matches_reference():
    """A few rows over many groups (empty groups, K and N not multiples of the narrow tiles), default tiles."""
    sizes = np.array([0, 3, 0, 1, 0, 0, 5, 2, 0, 0, 0, 1], np.int32)
    lhs, rhs, group_sizes, d_out = random_operands(13, sizes, jnp.bfloat16, m=14, k=200, n=90)
    assert_matches_reference(lhs, rhs, group_sizes, d_out, 1e-2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiled_ragged_dot_and_auto_agree_with_reference_on_cpu(case):
    sizes = CASES[case]
    lhs, rhs, group_sizes, d_out = random_operands(21, sizes, jnp.float32)
    want = forward_and_grads("reference", lhs, rhs, group_sizes, d_out)
    for impl in ("tiled", "ragged_dot", "auto"):
        for g, w in zip(forward_and_grads(impl, lhs, rhs, group_sizes, d_out), want):
            assert rel_err(g, w) < 1e-5, impl


def test_reference_is_a_per_row_matmul():
    """The reference against the definition itself: each row times its own group's matrix."""
    sizes = CASES["padding_rows"]
    lhs, rhs, group_sizes, _ = random_operands(4, sizes, jnp.float32)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    want = np.zeros((M, N))
    for r, e in enumerate(owner):
        want[r] = np.asarray(lhs[r], np.float64) @ np.asarray(rhs[e], np.float64)
    assert rel_err(grouped_matmul_reference(lhs, rhs, group_sizes), want) < 1e-6


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("case", ["empty_first_middle_last", "padding_rows", "many_groups_per_tile", "all_empty"])
def test_schedule_covers_each_row_once_with_its_own_groups(schedule, case):
    sizes = CASES.get(case, np.zeros(3, np.int32))
    block_m = 16
    owner = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), np.full(M - sizes.sum(), -1)])  # -1: padding
    starts, ends = group_bounds(jnp.asarray(sizes), M)
    row_start, row_stop, lo, hi = map(np.asarray, SCHEDULES[schedule](starts, ends, M, block_m))
    covered = np.zeros(M, int)
    for first, stop, g_lo, g_hi in zip(row_start, row_stop, lo, hi):
        assert 0 <= stop - first <= block_m, (first, stop)
        covered[first:stop] += 1
        listed = set(range(g_lo, g_hi))
        needed = set(owner[first:stop]) - {-1}
        assert needed <= listed, (first, stop, needed, listed)
        assert all(sizes[e] == 0 for e in listed - needed), (first, stop, needed, listed)  # extras are empty
        if schedule == "group":
            assert len(listed) <= 1 and len(set(owner[first:stop])) <= 1, (first, stop, listed)
    np.testing.assert_array_equal(covered, 1)  # every row stored exactly once


def test_aligned_schedule_matches_reference():
    aligned = Tiling(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, schedule="aligned")
    sizes = CASES["many_groups_per_tile"]
    lhs, rhs, group_sizes, d_out = random_operands(31, sizes, jnp.float32)
    assert_matches_reference(lhs, rhs, group_sizes, d_out, 1e-5, tiling=aligned)


def test_bad_inputs_raise_clear_errors():
    lhs, rhs, group_sizes, _ = random_operands(0, [40, 43], jnp.float32)
    bad = [
        (dict(lhs=lhs[None]), "lhs must be"),
        (dict(rhs=rhs[0]), "rhs must be"),
        (dict(lhs=lhs[:, :-1]), "share K"),
        (dict(rhs=rhs.astype(jnp.bfloat16)), "same dtype"),
        (dict(lhs=lhs.astype(jnp.int32), rhs=rhs.astype(jnp.int32)), "lhs dtype"),
        (dict(group_sizes=group_sizes[:1]), "group_sizes must have shape"),
        (dict(group_sizes=group_sizes.astype(jnp.float32)), "group_sizes must be int32"),
        (dict(group_sizes=jnp.array([50, 50], jnp.int32)), "sum <= M"),
        (dict(group_sizes=jnp.array([-1, 5], jnp.int32)), ">= 0"),
        (dict(impl="triton"), "impl must be one of"),
        (dict(impl="pallas", tiling="big"), "tiling must be"),
    ]
    if jax.default_backend() != "gpu":
        bad.append((dict(impl="pallas"), "needs a GPU"))
    for override, message in bad:
        args = dict(lhs=lhs, rhs=rhs, group_sizes=group_sizes, impl="auto", tiling=None) | override
        with pytest.raises(ValueError, match=message):
            grouped_matmul(args["lhs"], args["rhs"], args["group_sizes"], impl=args["impl"], tiling=args["tiling"])
    for kwargs, message in ((dict(block_m=48), "block_m must be a power of two"), (dict(block_k=8), "block_k"),
                            (dict(num_warps=3), "num_warps"), (dict(num_stages=0), "num_stages"),
                            (dict(schedule="rows"), "schedule")):
        with pytest.raises(ValueError, match=message):
            Tiling(**kwargs)


def test_operands_past_int32_offsets_are_refused():
    """The kernels index in int32: a 2**31-element weight must be refused, not silently wrap (traced only)."""
    x = jax.ShapeDtypeStruct((64, 2**16), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2, 2**16, 2**14), jnp.bfloat16)  # 2**31 elements
    sizes = jax.ShapeDtypeStruct((2,), jnp.int32)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        jax.eval_shape(lambda a, b, g: grouped_matmul_kernel(a, b, g, transpose_w=False, tiling=SMALL), x, w, sizes)


# ----- grouped_swiglu: the gate and up matmuls in one kernel (decode-sized calls) -----
def swiglu_twin(lhs, gate, up, group_sizes):
    """Two reference grouped matmuls and the element-wise SwiGLU, in float32."""
    def call(rhs):
        return grouped_matmul_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes)
    return jax.nn.silu(call(gate)) * call(up)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("sizes", [[2, 0, 1, 0], [0, 0, 0, 5], [1, 3, 0, 2, 0, 0, 1]], ids=["uneven", "one", "many"])
def test_grouped_swiglu_matches_two_calls(seed, sizes, dtype, tol):
    """The fused kernel (a few rows per group: the decode-sized path) against the twin: ragged groups, empty ones,
    padding rows past the groups, N and K no multiple of the tile."""
    from pallas_kernels.grouped_matmul import grouped_swiglu
    rows = sum(sizes) + 2  # two padding rows
    lhs, gate, group_sizes, _ = random_operands(seed, sizes, dtype, m=rows, k=40, n=37)
    up = jax.random.normal(jax.random.PRNGKey(seed + 1), gate.shape, jnp.float32).astype(dtype)
    got = grouped_swiglu(lhs, gate, up, group_sizes, impl="pallas", interpret=True)
    assert got.shape == (rows, 37) and got.dtype == dtype
    assert rel_err(got, swiglu_twin(lhs, gate, up, group_sizes)) < tol
    assert not np.asarray(got[-2:], np.float32).any()  # padding rows stay zero


def test_grouped_swiglu_fuses_only_small_calls_and_differentiates_through_the_twin(seed, monkeypatch):
    """Decode-sized calls run the gated kernel (one launch); larger ones and differentiated ones run two calls, whose
    gradients match the twin's."""
    from pallas_kernels.grouped_matmul import grouped_swiglu, ops
    launched = []
    kernel = ops.grouped_matmul_kernel

    def spy(*args, up=None, **kwargs):
        launched.append("gated" if up is not None else "plain")
        return kernel(*args, up=up, **kwargs)
    monkeypatch.setattr(ops, "grouped_matmul_kernel", spy)
    lhs, gate, group_sizes, d_out = random_operands(seed, [3, 0, 2], jnp.float32, m=6, k=24, n=20)
    up = jax.random.normal(jax.random.PRNGKey(seed + 1), gate.shape, jnp.float32)
    grouped_swiglu(lhs, gate, up, group_sizes, impl="pallas", interpret=True)
    assert launched == ["gated"]
    launched.clear()
    big, big_gate, big_sizes, _ = random_operands(seed, [40, 0, 30], jnp.float32, m=70, k=24, n=20)
    grouped_swiglu(big, big_gate, big_gate, big_sizes, impl="pallas", interpret=True)  # > 16 rows per group
    assert launched == ["plain", "plain"]
    launched.clear()
    got = jax.vjp(lambda a, b, c: grouped_swiglu(a, b, c, group_sizes, impl="pallas", interpret=True),
                  lhs, gate, up)[1](d_out)
    assert "gated" not in launched
    want = jax.vjp(lambda a, b, c: swiglu_twin(a, b, c, group_sizes), lhs, gate, up)[1](d_out)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_grouped_swiglu_refuses_mismatched_weights():
    from pallas_kernels.grouped_matmul import grouped_swiglu
    lhs, gate, group_sizes, _ = random_operands(0, [2, 1], jnp.float32, m=3, k=8, n=16)
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        grouped_swiglu(lhs, gate, gate[:, :, :8], group_sizes, impl="pallas", interpret=True)
