"""cuDNN's packed-sequence description of packed rows (`segment_runs`) against a Python loop over each row, on
random layouts of awkward sizes; the mask it describes against the segment mask; JAX's conversion of it into
cuDNN's flat token offsets; and the packed/bias dispatch of `causal_attention`, traced on the CPU (the cuDNN calls
cannot lower here; benchmarks/kernel_check.py --kinds packed runs them on the GPU)."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.layers import softmax_attention as sa
from m1jax.layers.softmax_attention import PACKED_MAX_RUNS, causal_attention, segment_runs


def runs_reference(segment_ids, max_runs):
    """The slow twin: walk each row, cutting a run wherever the id changes."""
    seg = np.asarray(segment_ids)
    batch, length = seg.shape
    seqlens = np.full((batch, max_runs), -1, np.int64)
    offsets = np.full((batch, max_runs + 1), -1, np.int64)
    fits = True
    for b in range(batch):
        runs = []  # [start, length, id]
        for t in range(length):
            if runs and seg[b, t] == runs[-1][2]:
                runs[-1][1] += 1
            else:
                runs.append([t, 1, seg[b, t]])
        ids = [r[2] for r in runs]
        fits &= len(runs) <= max_runs and len(set(ids)) == len(ids)
        for slot, (start, size, _) in enumerate(runs[:max_runs]):
            seqlens[b, slot], offsets[b, slot] = size, start
    return seqlens, offsets, fits


def random_layout(rng, kind, batch, length):
    """(B, T) int32 segment ids of one kind of layout; contiguous (every id in one run) unless kind says so."""
    if kind == "single":
        return np.full((batch, length), 7, np.int32)
    if kind == "ones":  # every token its own document
        return np.broadcast_to(np.arange(length, dtype=np.int32) + 1, (batch, length)).copy()
    rows = []
    for _ in range(batch):
        if kind == "few":
            cuts = rng.choice(np.arange(1, length), size=min(int(rng.integers(1, 6)), length - 1), replace=False)
        else:  # "many" runs, with length-1 documents among them
            cuts = np.flatnonzero(rng.random(length - 1) < 0.3) + 1
        row = np.searchsorted(np.sort(cuts), np.arange(length), side="right").astype(np.int32) + 1
        if kind == "padded" or rng.random() < 0.3:  # trailing padding as segment 0, as the task batches have it
            row[length - int(rng.integers(1, max(2, length // 3))):] = 0
        if kind == "left_padded":  # the inference prefill's layout: padding (0), then one prompt (1)
            row = (np.arange(length) >= rng.integers(0, length)).astype(np.int32)
        if kind == "returning" and row.max() >= 2:  # a later run takes an earlier run's id
            row[row == row.max()] = row.min()
        rows.append(row)
    return np.stack(rows)


LAYOUTS = [  # kind, batch, length, max_runs
    ("single", 3, 37, 4),
    ("single", 1, 1, 2),  # one token
    ("few", 2, 101, 8),
    ("few", 4, 2, 2),
    ("padded", 3, 53, 16),
    ("left_padded", 5, 29, 2),
    ("many", 2, 97, 64),  # about 30 runs: fits, length-1 documents among them
    ("many", 3, 61, 5),  # more runs than slots
    ("ones", 2, 13, 13),  # exactly as many runs as slots
    ("ones", 2, 13, 12),  # one more
    ("returning", 3, 45, 16),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: "-".join(map(str, c)))
def test_segment_runs_match_python_loop(rng, layout):
    kind, batch, length, max_runs = layout
    seg = random_layout(rng, kind, batch, length)
    want_lengths, want_offsets, want_fits = runs_reference(seg, max_runs)
    for fn in (segment_runs, jax.jit(segment_runs, static_argnums=1)):
        lengths, offsets, fits = fn(jnp.asarray(seg), max_runs)
        assert lengths.shape == (batch, max_runs) and offsets.shape == (batch, max_runs + 1)
        assert lengths.dtype == offsets.dtype == jnp.int32 and fits.shape == () and fits.dtype == jnp.bool_
        np.testing.assert_array_equal(lengths, want_lengths)
        np.testing.assert_array_equal(offsets, want_offsets)
        assert bool(fits) == want_fits


def test_the_fallback_predicate():
    """fits is False for more runs than slots and for an id that comes back, True otherwise (fixed layouts)."""
    fits = lambda rows, s: bool(segment_runs(jnp.asarray(rows, jnp.int32), s)[2])
    assert fits([[1, 1, 2, 2, 3]], 3) and not fits([[1, 1, 2, 2, 3]], 2)
    assert not fits([[1, 2, 1]], 8)  # id 1 comes back: its two runs see each other under the segment mask
    assert not fits([[4, 4, 4], [1, 2, 1]], 8)  # one row decides for the batch
    assert fits([[0, 0, 5, 5], [5, 5, 0, 0]], 2)  # ids are per row
    assert fits([[3, 2, 1, 0]], 4)  # ids need not be sorted
    with pytest.raises(ValueError, match="max_runs"):
        segment_runs(jnp.zeros((1, 4), jnp.int32), 1)


def mask_from_runs(lengths, offsets, length):
    """(B, T, T) bool: i sees j iff both lie in the same run and j <= i (what cuDNN computes per document)."""
    lengths, offsets = np.asarray(lengths), np.asarray(offsets)
    mask = np.zeros((lengths.shape[0], length, length), bool)
    for b in range(lengths.shape[0]):
        for size, start in zip(lengths[b], offsets[b]):
            if size > 0:
                mask[b, start:start + size, start:start + size] = np.tril(np.ones((size, size), bool))
    return mask


@pytest.mark.parametrize("kind", ["single", "few", "padded", "left_padded", "many", "ones"])
def test_runs_describe_the_segment_mask(rng, kind):
    """For layouts that fit, causal attention within each run is the segment mask, and the runs cover each row."""
    length = int(rng.integers(2, 90))
    seg = random_layout(rng, kind, 3, length)
    lengths, offsets, fits = segment_runs(jnp.asarray(seg), 90)  # slots for every run
    assert bool(fits)
    np.testing.assert_array_equal(np.where(np.asarray(lengths) > 0, lengths, 0).sum(1), length)
    segment_mask = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((length, length), bool))
    np.testing.assert_array_equal(mask_from_runs(lengths, offsets, length), segment_mask)


def test_returning_id_is_not_the_segment_mask():
    """Why fits must be False there: runs would cut the attention the segment mask allows."""
    seg = np.array([[1, 1, 2, 1]])
    lengths, offsets, fits = segment_runs(jnp.asarray(seg), 4)
    segment_mask = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((4, 4), bool))
    assert not bool(fits) and not np.array_equal(mask_from_runs(lengths, offsets, 4), segment_mask)


needs_cudnn_module = pytest.mark.skipif(sa._cudnn is None, reason="this JAX has no packed cuDNN entry point")


@needs_cudnn_module
def test_jax_turns_the_runs_into_cudnn_flat_offsets(rng):
    """JAX's own conversion (run inside the cuDNN call) of our (B, S) / (B, S + 1) arrays: lengths packed to the
    left, offsets as flat element offsets b*T*H*D + start*H*D (BTNH), the first unused entry the end of the buffer."""
    batch, length, heads, kv_heads, dim, slots = 3, 41, 4, 2, 8, 8
    seg = random_layout(rng, "few", batch, length)
    lengths, offsets, _ = segment_runs(jnp.asarray(seg), slots)
    q, k = jnp.zeros((batch, length, heads, dim)), jnp.zeros((batch, length, kv_heads, dim))
    flat = sa._cudnn._fix_seqlen_offsets(lengths, lengths, offsets, offsets, q, k)
    flat_lengths, _, flat_q, flat_k = (np.asarray(x).ravel() for x in flat)
    want_lengths, want_starts = [], []
    for b in range(batch):
        row, _, _ = runs_reference(seg[b:b + 1], slots)
        want_lengths += [n for n in row[0] if n > 0]
        want_starts += [b * length + int(o) for o in np.cumsum([0] + want_lengths[len(want_starts):])[:-1]]
    count = len(want_lengths)
    np.testing.assert_array_equal(flat_lengths[:count], want_lengths)
    np.testing.assert_array_equal(flat_lengths[count:], 0)
    np.testing.assert_array_equal(flat_q[:count], np.array(want_starts) * heads * dim)
    np.testing.assert_array_equal(flat_k[:count], np.array(want_starts) * kv_heads * dim)
    np.testing.assert_array_equal(flat_q[count:], batch * length * heads * dim)  # the end of the buffer


@pytest.fixture
def fake_hopper(monkeypatch):
    """Let the cuDNN calls trace on the CPU (abstract evaluation only: they lower only for CUDA)."""
    monkeypatch.setattr(sa._cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(sa._cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(sa, "packed_cudnn_supported", lambda: True)


def _primitives(jaxpr):
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


@needs_cudnn_module
@pytest.mark.parametrize("contiguous", [False, True])
def test_dispatch_traces_forward_and_backward(fake_hopper, contiguous):
    """The packed call, the bias fallback and the cond between them trace through jit and grad (GQA, bf16)."""
    batch, length, heads, kv_heads, dim = 2, 64, 4, 2, 32
    q = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((batch, length, kv_heads, dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(q, k, v, seg):
        out = causal_attention(q, k, v, seg, impl="cudnn", contiguous=contiguous)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, grads = jax.eval_shape(grad, q, k, k, seg)
    assert value.shape == () and [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    prims = _primitives(jax.make_jaxpr(grad)(q, k, k, seg).jaxpr)
    assert "dot_product_attention_fwd_wrapper" in prims and "dot_product_attention_bwd_wrapper" in prims
    assert ("cond" in prims) != contiguous


@needs_cudnn_module
def test_dispatch_without_segments_or_support_is_unchanged(fake_hopper, monkeypatch):
    """No segment_ids: plain causal cuDNN, no cond. Packed layout unsupported: the bias path, no cond."""
    q = jax.ShapeDtypeStruct((1, 32, 2, 16), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 32), jnp.int32)
    assert "cond" not in _primitives(jax.make_jaxpr(lambda q: causal_attention(q, q, q, impl="cudnn"))(q).jaxpr)
    monkeypatch.setattr(sa, "packed_cudnn_supported", lambda: False)
    prims = _primitives(jax.make_jaxpr(lambda q, s: causal_attention(q, q, q, s, impl="cudnn"))(q, seg).jaxpr)
    assert "cond" not in prims and "dot_product_attention_fwd_wrapper" in prims


def test_default_slots_and_workspace():
    """The default slot count is what causal_attention uses, and the workspace estimate grows with it."""
    assert isinstance(PACKED_MAX_RUNS, int) and PACKED_MAX_RUNS >= 2
    seg = jnp.asarray(np.arange(PACKED_MAX_RUNS + 1)[None], jnp.int32)
    assert segment_runs(seg[:, :-1])[0].shape == (1, PACKED_MAX_RUNS) and not bool(segment_runs(seg)[2])
    plain, packed = (sa.attention_workspace_bytes("cudnn", 4, 8192, 16, 128, masked=m) for m in (False, True))
    assert packed - plain > PACKED_MAX_RUNS * 8 * 4 * 8192 * 16 * 128  # the backward's per-slot accumulators


def test_no_packed_layout_off_gpu():
    assert jax.default_backend() != "gpu" and not sa.packed_cudnn_supported()
