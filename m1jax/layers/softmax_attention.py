"""Softmax attention layer of M1: grouped-query attention with partial RoPE, no biases, no qk-norm, scale 1/sqrt(D).

On GPU with bf16/fp16 activations it runs cuDNN's flash attention. Packed rows (segment_ids) go in as cuDNN's
packed-sequence layout where they can: each row's runs of equal id become documents, given by their lengths and
start offsets (`segment_runs`), and cuDNN runs causal attention within each document, skipping the blocks between
documents. That equals the segment mask (token i sees j <= i with equal id) exactly when no id comes back after
another id in its row; a row with a returning id or with more than PACKED_MAX_RUNS runs sends the whole batch (a
`lax.cond` on that device-side check) to `jax.nn.dot_product_attention(implementation="cudnn")` with the (B, 1, T, T)
segment mask, which cuDNN applies as a bias (its backward is several times slower). Elsewhere XLA's dense
implementation while its float32 (B, H, T, T) scores stay under DENSE_SCORES_MAX_BYTES, and beyond that a blocked
online-softmax path (`blocked_causal_attention`, FlashAttention's algorithm in plain JAX) whose memory grows linearly
in T.

Inference keeps a key/value cache per layer, (B, K, S, D) for S cache slots. Every row of a batch writes slot
`index` at the same step (prompts are left-padded); slots before a row's `start` hold padding. A query at slot i
sees the keys at slots j with start <= j <= i (and always its own slot, so a padding query is never left with no
key). The cache keeps (B, K, S, D) rather than (B, S, K, D): attention is then a matmul batched over (B, K), the
leading axes, and a decode step reads the cache in place instead of transposing it.
"""
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import M1Config, RunPolicy
from m1jax.layers.partitioning import Module
from m1jax.layers.projection import projection
from m1jax.layers.rope import apply_rope

CACHE_BLOCK = 1024  # key slots per step of the blockwise (online-softmax) attention over a cache
ATTENTION_BLOCK = 512  # query and key rows per step of the blocked (flash-style) causal attention
DENSE_SCORES_MAX_BYTES = 2 ** 28  # above this many bytes of float32 scores (B, H, T, T), the blocked path is used
# Documents (runs of equal segment id) per row that cuDNN's packed path describes; a row with more takes the bias path.
# JAX gives cuDNN B * S sequences of up to T tokens each, so its backward holds float32 accumulators of about
# 8 * S * B * T * H * D bytes (0.5 GiB per slot at B=4, T=8192, H=16, D=128: 8.2 GiB at S=16 against 1.1 GiB for the
# bias path, measured on an H200) and its time grows ~0.04 ms per slot there; 16 slots take rows of up to 16
# documents (e.g. 512-token ones at T=8192). Forward + backward there, 5 documents a row: 3.7 ms (8 slots), 6.0 ms
# (64), against 16.4 ms with the bias and 8.0 ms for unmasked causal attention (benchmarks/RESULTS.md).
PACKED_MAX_RUNS = 16
PACKED_MIN_CUDNN = 90600  # cuDNN's packed layout: 9.6 or later (JAX's tests), on Hopper or later (JAX checks that)

try:  # JAX-private: a JAX without cuDNN's packed layout keeps the bias path
    from jax._src.cudnn import fused_attention_stablehlo as _cudnn
    if not {"q_offsets", "kv_offsets", "q_seqlen", "kv_seqlen"} <= set(
            inspect.signature(_cudnn.dot_product_attention).parameters) or not hasattr(_cudnn.MaskType,
                                                                                      "PADDING_CAUSAL"):
        _cudnn = None
except (ImportError, AttributeError, TypeError, ValueError):
    _cudnn = None


def attention_impl(batch: int, length: int, heads: int, dtype, masked: bool, platform: str | None = None) -> str:
    """Which causal attention path runs: "cudnn" (GPU, bf16/fp16; packed rows at an even length only, as the bias
    their packed-layout path falls back to is taken for training only at an even length), "dense" (XLA's, builds the
    (B, H, T, T) scores), or "blocked" (online softmax over key blocks, memory O(B H T D)) when the dense scores would
    exceed DENSE_SCORES_MAX_BYTES."""
    platform = platform or jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not (masked and length % 2):
        return "cudnn"
    return "blocked" if batch * heads * length * length * 4 > DENSE_SCORES_MAX_BYTES else "dense"


def attention_workspace_bytes(impl: str, batch: int, length: int, heads: int, head_dim: int,
                              masked: bool = False) -> int:
    """Bytes one softmax layer's attention needs beyond q, k, v and its output, forward and backward: the dense
    path holds four float32 (B, H, T, T) arrays (scores, probabilities and their gradients; XLA's CPU compilation
    of a gradient step measures exactly that); the blocked path a few (B, H, block, block) tiles and the float32
    log-sum-exp and accumulators (B, H, T) / (B, H, T, D); cuDNN the log-sum-exp (B, H, T), plus with packed rows
    both branches of the packed/bias choice (a `lax.cond` holds buffers for both): the packed path's statistics and
    backward accumulators per document slot, float32 (S B, H, T) and about two (S B, T, H, D) for S = PACKED_MAX_RUNS
    (XLA's compilation on an H200 measures that within 4%), and the bias path's (B, 1, T, T) mask and bf16 bias."""
    if impl == "dense":
        return 4 * batch * heads * length * length * 4
    if impl == "blocked":
        block = min(ATTENTION_BLOCK, length)
        return 4 * batch * heads * block * block * 4 + batch * heads * length * (2 + 2 * head_dim) * 4
    packed = PACKED_MAX_RUNS * batch * heads * length * (4 + 8 * head_dim) + 3 * batch * length * length
    return batch * heads * length * 4 + (packed if masked else 0)


def segment_runs(segment_ids: jax.Array, max_runs: int = PACKED_MAX_RUNS):
    """cuDNN's packed-sequence description of packed rows. segment_ids: (B, T) int.

    Each row's maximal runs of equal id are its documents, in order. Returns
    seqlens (B, S) int32: run lengths, -1 in the slots after a row's last run (S = max_runs);
    offsets (B, S + 1) int32: each run's first position within its row (0 first), -1 after the last run (the
    extra last column is always -1: JAX's `fused_attention_stablehlo.dot_product_attention` takes (B, M) lengths
    and (B, M + 1) offsets with -1 padding, and makes cuDNN's flat token offsets itself);
    fits () bool: the description is exact, i.e. every row has at most S runs and no id in two runs of its row
    (then "j <= i in the same run" equals the segment mask "j <= i with the same id"). Rows with more runs list
    their first S, and fits is False.
    """
    if not isinstance(max_runs, int) or max_runs < 2:
        raise ValueError(f"max_runs={max_runs!r}: cuDNN's packed layout needs an integer >= 2 (1 is no packing)")
    batch, length = segment_ids.shape
    seg = segment_ids.astype(jnp.int32)
    change = seg[:, 1:] != seg[:, :-1]
    first = jnp.concatenate([jnp.ones((batch, 1), bool), change], axis=1)  # a run starts here
    last = jnp.concatenate([change, jnp.ones((batch, 1), bool)], axis=1)  # a run ends here
    position = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    rows = jnp.arange(batch)[:, None]

    def listed(flags):  # (B, S): the positions of each row's first S flags, -1 after
        slot = jnp.where(flags, jnp.cumsum(flags, axis=1) - 1, max_runs)  # slot S and beyond: dropped
        return jnp.full((batch, max_runs), -1, jnp.int32).at[rows, slot].set(position, mode="drop")

    starts, ends = listed(first), listed(last)
    valid = starts >= 0
    seqlens = jnp.where(valid, ends - starts + 1, -1)
    offsets = jnp.concatenate([starts, jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    ids = jnp.take_along_axis(seg, jnp.maximum(starts, 0), axis=1)  # each run's id
    pairs = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(max_runs, dtype=bool)
    returning = jnp.any((ids[:, :, None] == ids[:, None, :]) & pairs)
    fits = jnp.all(jnp.sum(first, axis=1) <= max_runs) & ~returning
    return seqlens, offsets, fits


@functools.cache
def packed_cudnn_supported() -> bool:
    """Whether cuDNN's packed layout can run here: JAX's private entry point is there, the default backend is a CUDA
    GPU of compute capability 9.0 or later (JAX refuses the packed layout below Hopper) and cuDNN is >= 9.6."""
    if _cudnn is None or jax.default_backend() != "gpu":
        return False
    try:
        return _cudnn.check_cudnn_version() >= PACKED_MIN_CUDNN and _cudnn.check_compute_capability("9.0")
    except Exception:  # noqa: BLE001 (a ROCm or unknown backend, no cuDNN: the bias path stays)
        return False


def packed_cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, seqlens: jax.Array,
                           offsets: jax.Array) -> jax.Array:
    """cuDNN flash attention, causal within each packed document. q: (B, T, H, D); k, v: (B, T, K, D), bf16/fp16;
    seqlens (B, S), offsets (B, S + 1): `segment_runs` of the rows. Returns (B, T, H, D). Every position must lie
    in some run (`segment_runs` covers the whole row), or its output is undefined."""
    if _cudnn is None:
        raise RuntimeError("cuDNN's packed layout needs jax._src.cudnn.fused_attention_stablehlo.dot_product_attention "
                           "with q_offsets, missing from this JAX; call causal_attention, which takes the bias path")
    return _cudnn.dot_product_attention(q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets,
                                        kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                        mask_type=_cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     impl: str) -> jax.Array:
    """XLA's dense path (impl "dense") or cuDNN with the segment mask as a (B, 1, T, T) bias (impl "cudnn")."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (B, 1, T, T)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=q.shape[-1] ** -0.5,
                                        implementation="cudnn" if impl == "cudnn" else None)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None,
                     impl: str = "auto", contiguous: bool = False) -> jax.Array:
    """q: (B, T, H, D); k, v: (B, T, K, D); segment_ids: (B, T) or None. Returns (B, T, H, D).

    Token i attends to tokens j <= i of its own segment (packed documents never see each other).
    impl: "auto" (see `attention_impl`), "dense", "blocked" or "cudnn". With cuDNN and segment_ids, the packed layout
    (`segment_runs`) runs when every row fits it, else the bias path: a `lax.cond` on a device-side check, decided
    on the host instead for concrete segment_ids. contiguous=True is the caller's promise that every row has at most
    PACKED_MAX_RUNS runs and no id in two runs (e.g. left padding, then one prompt): no check, no `lax.cond`.
    """
    batch, length, heads, _ = q.shape
    if impl == "auto":
        impl = attention_impl(batch, length, heads, q.dtype, segment_ids is not None)
    if impl == "blocked":
        return blocked_causal_attention(q, k, v, segment_ids)
    if impl not in ("dense", "cudnn"):
        raise ValueError(f"impl={impl!r}; use 'auto', 'dense', 'blocked' or 'cudnn'")
    if impl == "dense" or segment_ids is None or not packed_cudnn_supported():
        return masked_attention(q, k, v, segment_ids, impl)
    seqlens, offsets, fits = segment_runs(segment_ids, PACKED_MAX_RUNS)
    if contiguous:
        return packed_cudnn_attention(q, k, v, seqlens, offsets)
    if not isinstance(fits, jax.core.Tracer):
        return (packed_cudnn_attention(q, k, v, seqlens, offsets) if bool(fits)
                else masked_attention(q, k, v, segment_ids, impl))
    return jax.lax.cond(fits, lambda q, k, v, seg, n, o: packed_cudnn_attention(q, k, v, n, o),
                        lambda q, k, v, seg, n, o: masked_attention(q, k, v, seg, "cudnn"),
                        q, k, v, segment_ids, seqlens, offsets)


# ----- blocked causal attention: online softmax forward, recomputing backward (FlashAttention's algorithm) -----
# Per query block i and key block j <= i: s = q_i k_j^T / sqrt(D) (float32), masked to j' <= i' and equal segments;
# running max m, sum l and accumulator acc give out_i = acc / l and lse_i = m + log l. The backward recomputes
# p = exp(s - lse_i) block by block: dv_j = sum_i p^T do_i, ds = p * (do_i v_j^T - rowsum(do_i * out_i)),
# dq_i = sum_j ds k_j / sqrt(D), dk_j = sum_i ds^T q_i / sqrt(D). Nothing of size T x T is ever held.

def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, T, ...) with T a multiple of block -> (n, B, block, ...)."""
    n = x.shape[1] // block
    return jnp.moveaxis(x.reshape((x.shape[0], n, block) + x.shape[2:]), 1, 0)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
    """(n, B, block, ...) -> (B, length, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _tile(qi, kj, seg_q, seg_k, i, j, block):
    """float32 scores (B, K, G, block_q, block_k) of query block i against key block j, and their mask."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * qi.shape[-1] ** -0.5
    rows = i * block + jnp.arange(block)
    cols = j * block + jnp.arange(block)
    mask = (rows[:, None] >= cols[None, :])[None] & (seg_q[:, :, None] == seg_k[:, None, :])  # (B, q, s)
    return scores, mask[:, None, None]


def _online_softmax_init(shape: tuple[int, ...], dim: int):
    """The (running max, running sum, accumulator) an online softmax starts from: shape (..., queries), and the
    accumulator (..., queries, dim); all float32."""
    return (jnp.full(shape, -1e30, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (dim,), jnp.float32))


def _online_softmax_step(carry, scores, visible, values, spec: str):
    """One key block of an online softmax (FlashAttention's update): scores (..., queries, keys) float32, visible
    (broadcastable to scores), values multiplied in by the einsum `spec` (probabilities, values -> (..., queries,
    dim)). The running max rescales what was summed before, so the result equals one softmax over all blocks."""
    running_max, running_sum, acc = carry
    new_max = jnp.maximum(running_max, jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1))
    probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
    rescale = jnp.exp(running_max - new_max)
    pv = jnp.einsum(spec, probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return new_max, rescale * running_sum + probs.sum(-1), rescale[..., None] * acc + pv


def _blocked_forward(q, k, v, seg, block):
    """q: (n, B, block, K, G, D); k, v: (n, B, block, K, D); seg: (n, B, block).
    Returns out (n, B, block, K, G, D) float32 and lse (n, B, K, G, block) float32."""
    n, batch, _, kv_heads, groups, dim = q.shape

    def query_block(i):
        qi, seg_q = q[i], seg[i]

        def visit(j, carry):
            scores, mask = _tile(qi, k[j], seg_q, seg[j], i, j, block)
            return _online_softmax_step(carry, scores, mask, v[j], "bkgqs,bskd->bkgqd")

        init = _online_softmax_init((batch, kv_heads, groups, block), dim)
        m, l, acc = jax.lax.fori_loop(0, i + 1, visit, init)  # every row sees its own position: l > 0
        out = acc / l[..., None]
        return out.transpose(0, 3, 1, 2, 4), m + jnp.log(l)

    return jax.lax.map(query_block, jnp.arange(n))


def _blocked_backward(q, k, v, seg, out, lse, dout, block):
    """Gradients (dq, dk, dv) in the block layout of `_blocked_forward`, float32."""
    n = q.shape[0]
    scale = q.shape[-1] ** -0.5
    delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", dout, out)  # rowsum(do * out)

    def grads(i, j):
        scores, mask = _tile(q[i], k[j], seg[i], seg[j], i, j, block)
        p = jnp.where(mask, jnp.exp(scores - lse[i][..., None]), 0.0)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dout[i], v[j], preferred_element_type=jnp.float32)
        return p, p * (dp - delta[i][..., None])

    def dq_block(i):
        def visit(j, dq):
            _, ds = grads(i, j)
            return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k[j].astype(jnp.float32)) * scale
        return jax.lax.fori_loop(0, i + 1, visit, jnp.zeros(q.shape[1:], jnp.float32))

    def dkv_block(j):
        def visit(i, carry):
            dk, dv = carry
            p, ds = grads(i, j)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, dout[i])
            return dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q[i].astype(jnp.float32)) * scale, dv
        zeros = jnp.zeros(k.shape[1:], jnp.float32)
        return jax.lax.fori_loop(j, n, visit, (zeros, zeros))

    dq = jax.lax.map(dq_block, jnp.arange(n))
    dk, dv = jax.lax.map(dkv_block, jnp.arange(n))
    return dq, dk, dv


def _to_blocks(q, k, v, segment_ids, block):
    """Pad T up to a multiple of block (padding rows get segment -1: they see only padding) and split."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    padded = -(-length // block) * block
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    seg = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.pad(seg, [(0, 0), (0, padded - length)], constant_values=-1)
    q = pad(q).reshape(batch, padded, kv_heads, heads // kv_heads, dim)
    return _blocks(q, block), _blocks(pad(k), block), _blocks(pad(v), block), _blocks(seg, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, segment_ids, block):
    return _blocked_fwd(q, k, v, segment_ids, block)[0]


def _blocked_fwd(q, k, v, segment_ids, block):
    qb, kb, vb, seg = _to_blocks(q, k, v, segment_ids, block)
    out, lse = _blocked_forward(qb, kb, vb, seg, block)
    result = _from_blocks(out, q.shape[1]).reshape(q.shape).astype(q.dtype)
    return result, (q, k, v, segment_ids, out, lse)


def _blocked_bwd(block, residuals, dresult):
    q, k, v, segment_ids, out, lse = residuals
    qb, kb, vb, seg = _to_blocks(q, k, v, segment_ids, block)
    dout = _to_blocks(dresult.astype(jnp.float32), k, v, None, block)[0]
    dq, dk, dv = _blocked_backward(qb, kb, vb, seg, out, lse, dout, block)
    length = q.shape[1]
    return (_from_blocks(dq, length).reshape(q.shape).astype(q.dtype), _from_blocks(dk, length).astype(k.dtype),
            _from_blocks(dv, length).astype(v.dtype), None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None,
                             block: int = ATTENTION_BLOCK) -> jax.Array:
    """`causal_attention` without the (T, T) matrix: q (B, T, H, D); k, v (B, T, K, D); segment_ids (B, T) or None.

    Query block i visits key blocks 0..i only (causal), about half the dense flops; T is padded up to a multiple of
    the block (the padding rows are dropped). Differentiable (a custom VJP recomputing the tiles).
    """
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r} must be a positive integer")
    return _blocked(q, k, v, segment_ids, min(block, q.shape[1]))


def _visible(query_slots: jax.Array, key_slots: jax.Array, start: jax.Array) -> jax.Array:
    """(B, T, S') bool: key slot j is visible to query slot i of row b iff start_b <= j <= i, or j == i."""
    i, j = query_slots[None, :, None], key_slots[None, None, :]
    return ((j >= start[:, None, None]) & (j <= i)) | (j == i)


def reference_cache_attention(q: jax.Array, key_cache: jax.Array, value_cache: jax.Array, query_slots: jax.Array,
                              start: jax.Array) -> jax.Array:
    """The slow twin: dense float32 softmax over every cache slot. q: (B, T, H, D) at slots query_slots (T,);
    key_cache, value_cache: (B, K, S, D); start: (B,). Returns (B, T, H, D) in q.dtype."""
    batch, length, heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, key_cache.astype(jnp.float32)) * dim ** -0.5
    visible = _visible(query_slots, jnp.arange(slots), start)[:, None, None]  # (B, 1, 1, T, S)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, value_cache.astype(jnp.float32))
    return out.reshape(batch, length, heads, dim).astype(q.dtype)


def decode_attention(q: jax.Array, key_cache: jax.Array, value_cache: jax.Array, index: jax.Array,
                     start: jax.Array) -> jax.Array:
    """One query per row at slot `index` (its key already written). q: (B, 1, H, D); caches (B, K, S, D).

    Dense over all S slots (masked): two matmuls batched over (B, K) that read the cache once, in place.
    """
    batch, _, heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).astype(key_cache.dtype)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, key_cache, preferred_element_type=jnp.float32) * dim ** -0.5
    visible = _visible(index[None], jnp.arange(slots), start)[:, :, None, :]  # (B, 1, 1, S)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(value_cache.dtype), value_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, 1, heads, dim).astype(q.dtype)


# One query per row over a long cache as split-KV (FlashDecoding): the slots in chunks, each chunk's softmax and
# weighted values computed at once, then merged by their maxima (the dense form's probabilities x values is one
# reduction over all S slots per (kv head, query group)). Caches of at least DECODE_SPLIT_MIN_SLOTS slots take it
# (None: never). research-1b batch-1 decode on an H200, ms/token dense / split (benchmarks/RESULTS.md, "Inference",
# `benchmarks/inference.py --sections split`): 2K 0.876 / 0.908, 8K 0.904 / 0.905, 32K 0.947 / 0.920,
# 128K 1.051 / 0.994, 1M 2.107 / 1.510.
DECODE_SPLIT_MIN_SLOTS: int | None = 32768
DECODE_SPLIT_CHUNK = 4096  # the most slots per chunk


def split_chunk(slots: int) -> int | None:
    """The chunk length of `split_decode_attention` for a cache of `slots` (the largest divisor of it up to
    DECODE_SPLIT_CHUNK, at least 64: the engine's caches are multiples of 64), or None for the dense form."""
    if DECODE_SPLIT_MIN_SLOTS is None or slots < DECODE_SPLIT_MIN_SLOTS:
        return None
    return next((c for c in range(min(DECODE_SPLIT_CHUNK, slots), 63, -1) if slots % c == 0), None)


def split_decode_attention(q: jax.Array, key_cache: jax.Array, value_cache: jax.Array, index: jax.Array,
                           start: jax.Array, chunk: int) -> jax.Array:
    """`decode_attention` over the slots cut into C = S / chunk chunks. q: (B, 1, H, D); caches (B, K, S, D).

    Per chunk c: m_c = max of its visible scores, l_c = sum exp(s - m_c), a_c = sum exp(s - m_c) v; then
    out = sum_c exp(m_c - m) a_c / sum_c exp(m_c - m) l_c with m = max_c m_c. The caches are reshaped in place
    (B, K, C, chunk, D); the chunk axis is a batch axis of both matmuls.
    """
    batch, _, heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    if slots % chunk:
        raise ValueError(f"split_decode_attention: chunk {chunk} does not divide the cache's {slots} slots")
    count = slots // chunk
    chunks = lambda cache: cache.reshape(batch, kv_heads, count, chunk, dim)
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).astype(key_cache.dtype)
    scores = jnp.einsum("bkgd,bkcsd->bkcgs", qg, chunks(key_cache), preferred_element_type=jnp.float32) * dim ** -0.5
    visible = _visible(index[None], jnp.arange(slots), start).reshape(batch, 1, count, 1, chunk)
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.maximum(jnp.max(scores, axis=-1), -1e30)  # (B, K, C, G); a chunk with no visible slot stays finite
    probs = jnp.exp(scores - top[..., None])  # 0 off the visible slots
    parts = jnp.einsum("bkcgs,bkcsd->bkcgd", probs.astype(value_cache.dtype), chunks(value_cache),
                       preferred_element_type=jnp.float32)
    weight = jnp.exp(top - jnp.max(top, axis=2, keepdims=True))  # (B, K, C, G)
    out = jnp.einsum("bkcg,bkcgd->bkgd", weight, parts) / jnp.einsum("bkcg,bkcg->bkg", weight, probs.sum(-1))[..., None]
    return out.reshape(batch, 1, heads, dim).astype(q.dtype)


def blockwise_cache_attention(q: jax.Array, key_cache: jax.Array, value_cache: jax.Array, query_slots: jax.Array,
                              start: jax.Array, block: int = CACHE_BLOCK) -> jax.Array:
    """A chunk of T queries at slots query_slots (T,) over the cache, with an online softmax over key blocks.

    Only the blocks up to the last query slot are visited (a `fori_loop` with a traced bound), so a chunk late in
    a long prompt costs its share of the context and memory stays (B, H, T, block) whatever S is.
    q: (B, T, H, D); caches (B, K, S, D); start (B,). Returns (B, T, H, D) in q.dtype.
    """
    batch, length, heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    groups = heads // kv_heads
    block = min(block, slots)
    qg = q.reshape(batch, length, kv_heads, groups, dim).astype(key_cache.dtype)
    num_blocks = (query_slots[-1] + block) // block  # blocks holding slots 0 .. last query slot

    def visit(b, carry):
        first = b * block
        offset = jnp.minimum(first, slots - block)  # the last block is shifted back to stay inside the cache
        keys = jax.lax.dynamic_slice_in_dim(key_cache, offset, block, axis=2)
        values = jax.lax.dynamic_slice_in_dim(value_cache, offset, block, axis=2)
        scores = jnp.einsum("btkgd,bksd->bkgts", qg, keys, preferred_element_type=jnp.float32) * dim ** -0.5
        key_slots = offset + jnp.arange(block)
        visible = _visible(query_slots, key_slots, start) & (key_slots >= first)[None, None]  # no slot twice
        visible = visible[:, None, None]  # (B, 1, 1, T, block)
        return _online_softmax_step(carry, scores, visible, values, "bkgts,bksd->bkgtd")

    init = _online_softmax_init((batch, kv_heads, groups, length), dim)
    _, total, acc = jax.lax.fori_loop(0, num_blocks, visit, init)
    out = acc / total[..., None]  # every query sees at least its own slot: total > 0
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim).astype(q.dtype)


def cached_attention(q, k, v, cache: dict, index: jax.Array, start: jax.Array, fresh: bool = False):
    """Write this step's keys/values at slots index .. index+T-1, then attend over the cache.

    q: (B, T, H, D); k, v: (B, T, K, D); cache {"key", "value"}: (B, K, S, D). Returns (out, new cache).
    One token takes `decode_attention` (or `split_decode_attention`, see DECODE_SPLIT_MIN_SLOTS). A first chunk
    (fresh: nothing written before it, index 0, known on the host: `Cache.fresh`) needs nothing from the cache and
    takes the causal path within itself, its left padding (slots before each row's start) a segment of its own
    (cuDNN flash attention on GPU, in its packed layout: two runs at most, so `causal_attention(contiguous=True)`
    needs no check); other chunks the blockwise path.
    The choice is static: a `lax.cond` on the index would make XLA's GPU runtime read its predicate back to the
    host, so a prefill could not be queued behind a running decode call.
    """
    length = q.shape[1]
    write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.transpose(0, 2, 1, 3).astype(c.dtype), index,
                                                             axis=2)
    # The barrier keeps each update one in-place write that attention and the returned cache share; without it XLA
    # may fuse the write into both users and copy the whole cache for each of them on every step.
    key_cache, value_cache = jax.lax.optimization_barrier((write(cache["key"], k), write(cache["value"], v)))
    if length == 1:
        chunk = split_chunk(key_cache.shape[2])
        out = (decode_attention(q, key_cache, value_cache, index, start) if chunk is None else
               split_decode_attention(q, key_cache, value_cache, index, start, chunk))
    elif fresh:  # real tokens see the real tokens before them, as in the cache (padding outputs are never read)
        real = (jnp.arange(length, dtype=jnp.int32)[None, :] >= start[:, None]).astype(jnp.int32)
        out = causal_attention(q, k.astype(key_cache.dtype), v.astype(value_cache.dtype), real,
                               contiguous=True).astype(q.dtype)  # ids 0 then 1: at most two runs
    else:
        query_slots = index + jnp.arange(length, dtype=jnp.int32)
        out = blockwise_cache_attention(q, key_cache, value_cache, query_slots, start)
    return out, {"key": key_cache, "value": value_cache}


class SoftmaxAttention(Module):
    """x: (B, T, hidden) -> ((B, T, hidden), new cache or None). Parameters q_proj, k_proj, v_proj, o_proj.

    Without a cache: causal attention over x (segment_ids separate packed documents). With a cache
    {"key", "value"}: (B, K, S, D) and cache_slots = (index () int32, start (B,) int32, fresh bool): see
    `cached_attention`.
    """

    config: M1Config
    policy: RunPolicy = RunPolicy()

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: dict | None = None, cache_slots: tuple[jax.Array, jax.Array, bool] | None = None):
        cfg, policy = self.config, self.policy
        batch, length, _ = x.shape
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        project = lambda features, name, axes: projection(cfg, policy, features, name, axes)(x)
        q = project(heads * dim, "q_proj", ("embed", "heads")).reshape(batch, length, heads, dim)
        k = project(kv_heads * dim, "k_proj", ("embed", "kv_heads")).reshape(batch, length, kv_heads, dim)
        v = project(kv_heads * dim, "v_proj", ("embed", "kv_heads")).reshape(batch, length, kv_heads, dim)
        q = apply_rope(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rotary_dim, cfg.rope_theta)
        with jax.named_scope("softmax_attention"):
            if cache is None:
                out, new_cache = causal_attention(q, k, v, segment_ids), None
            else:
                out, new_cache = cached_attention(q, k, v, cache, *cache_slots)
        out = projection(cfg, policy, cfg.hidden_size, "o_proj", ("heads", "embed"))(
            out.reshape(batch, length, heads * dim))
        return out, new_cache
