"""The lightning layer's optional short causal convolution (`M1Config.lightning_short_conv`): the shifted-copies
form against a per-token loop on awkward sizes and packed layouts; in the model, the identity at init (same logits
as without it), and with a perturbed kernel still causal and blind to other packed documents; the config's checks,
the refused HF export and inference path, and the helpers that walk the parameter tree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import M1Config, M1ForCausalLM, abstract_params, init_params
from m1jax.config import RunPolicy, architecture_differences
from m1jax.inference import init_cache
from m1jax.layers.lightning_attention import LightningAttention
from m1jax.layers.short_conv import causal_short_conv
from m1jax.model import param_logical_axes
from m1jax.params import count_params
from m1jax.plan import plan

WIDTH = 4
POLICY = RunPolicy(block_size=8)  # the lightning kernel in blocks of 8, so documents cross blocks


def conv_reference(x, kernel, segment_ids=None):
    """The slow twin: out[b, t] = sum_j kernel[W-1-j] x[b, t-j] over earlier tokens of t's document, in float64."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    batch, length, _ = x.shape
    out = np.zeros_like(x)
    for b in range(batch):
        for t in range(length):
            for j in range(kernel.shape[0]):
                if t - j >= 0 and (segment_ids is None or segment_ids[b, t - j] == segment_ids[b, t]):
                    out[b, t] += kernel[-1 - j] * x[b, t - j]
    return out


def packed_layout(rng, batch, length):
    """(B, T) ids: documents 1, 2, ... of random lengths (some of one token), padding runs (id 0) between and after."""
    rows = []
    for _ in range(batch):
        row, doc = [], 1
        while len(row) < length:
            if rng.random() < 0.2:
                row += [0] * int(rng.integers(1, 4))
            else:
                row += [doc] * int(rng.integers(1, 7))
                doc += 1
        rows.append(row[:length])
    return np.asarray(rows, np.int32)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("length", [23, 3])  # 3 < W: the widest kernel runs past the row's start everywhere
def test_shifted_copies_equal_a_per_token_loop(rng, width, packed, length):
    x = rng.standard_normal((3, length, 5)).astype(np.float32)
    kernel = rng.standard_normal((width, 5)).astype(np.float32)
    segments = packed_layout(rng, 3, length) if packed else None
    got = causal_short_conv(jnp.asarray(x), jnp.asarray(kernel), None if segments is None else jnp.asarray(segments))
    assert got.shape == x.shape and got.dtype == jnp.float32
    # at most W float32 products summed, each |term| <= |k||x|: a few ulps of sum |k||x| bounds the error
    scale = conv_reference(np.abs(x), np.abs(kernel)) + 1e-30
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - conv_reference(x, kernel, segments)),
                                 1e-6 * scale + 1e-30)
    assert causal_short_conv(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel)).dtype == jnp.bfloat16  # x's dtype


@pytest.fixture(scope="module")
def models():
    """(config without the convolution, config with W = 4, parameters of the latter; tiny: [lightning, softmax] x 2)."""
    cfg = M1Config.from_preset("tiny")
    conv_cfg = cfg.replace(lightning_short_conv=WIDTH)
    return cfg, conv_cfg, init_params(conv_cfg, jax.random.key(7), policy=POLICY)


def without_conv(params):
    groups = {name: {**layer, "attn": {k: v for k, v in layer["attn"].items() if k != "short_conv"}}
              for name, layer in params["groups"].items()}
    return {**params, "groups": groups}


def with_kernel(params, rng):
    """params with every lightning layer's kernel random (its identity init plus noise)."""
    groups = dict(params["groups"])
    kernel = groups["layer_0"]["attn"]["short_conv"]
    noisy = kernel + 0.5 * jnp.asarray(rng.standard_normal(kernel.shape), kernel.dtype)
    groups["layer_0"] = {**groups["layer_0"], "attn": {**groups["layer_0"]["attn"], "short_conv": noisy}}
    return {**params, "groups": groups}


def test_the_convolution_is_the_identity_at_init(models, rng):
    cfg, conv_cfg, params = models
    heads_channels = 3 * cfg.num_heads * cfg.head_dim
    kernel = params["groups"]["layer_0"]["attn"]["short_conv"]
    assert kernel.shape == (cfg.num_groups, WIDTH, heads_channels)
    np.testing.assert_array_equal(kernel, np.broadcast_to(np.eye(1, WIDTH, WIDTH - 1).T, kernel.shape))
    assert "short_conv" not in params["groups"]["layer_1"]["attn"]  # softmax layers have none
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 29)))
    segments = jnp.asarray(packed_layout(rng, 2, 29))
    got = M1ForCausalLM(conv_cfg, POLICY).apply({"params": params}, ids, segment_ids=segments).logits
    want = M1ForCausalLM(cfg, POLICY).apply({"params": without_conv(params)}, ids, segment_ids=segments).logits
    np.testing.assert_array_equal(got, want)  # 1 * x + 0 * (finite) is x exactly


def test_a_trained_kernel_changes_the_output_but_stays_causal_and_within_documents(models, rng):
    cfg, conv_cfg, params = models
    params = with_kernel(params, rng)
    model = M1ForCausalLM(conv_cfg, POLICY)
    logits = lambda ids, **kw: np.asarray(model.apply({"params": params}, jnp.asarray(ids), **kw).logits)
    ids = rng.integers(0, cfg.vocab_size, (1, 27))
    base = logits(ids)
    identity = np.asarray(M1ForCausalLM(cfg, POLICY).apply({"params": without_conv(params)}, jnp.asarray(ids)).logits)
    assert np.abs(base - identity).max() > 1e-3 * np.abs(identity).max()

    changed = ids.copy()
    changed[:, 13:] = (changed[:, 13:] + 1) % cfg.vocab_size  # tokens 13.. differ; 0..12 must not notice
    later = logits(changed)
    np.testing.assert_allclose(later[:, :13], base[:, :13], rtol=1e-5, atol=1e-5 * np.abs(base).max())
    assert np.abs(later[:, 13:] - base[:, 13:]).max() > 1e-3 * np.abs(base).max()

    lengths = [11, 1, 4, 9, 2]  # the kernel spans document boundaries; the fourth document starts on a block
    docs = [rng.integers(0, cfg.vocab_size, (1, n)) for n in lengths]
    segments = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    packed = logits(np.concatenate(docs, axis=1), segment_ids=jnp.asarray(segments))
    alone = np.concatenate([logits(d) for d in docs], axis=1)
    np.testing.assert_allclose(packed, alone, rtol=2e-5, atol=2e-5)


def test_padding_inputs_reach_no_token(models, rng):
    """token_mask without a state: padding gets zero q, k, v as before, and its inputs do not leak into later
    tokens through the convolution."""
    cfg, conv_cfg, _ = models
    layer = LightningAttention(conv_cfg, POLICY)
    x = jnp.asarray(rng.standard_normal((2, 13, cfg.hidden_size)), jnp.float32)
    mask = jnp.asarray(np.arange(13)[None] >= np.array([[0], [5]]))  # row 1: five leading pads
    variables = layer.init(jax.random.key(0), x, 0, token_mask=mask)
    kernel = variables["params"]["short_conv"]
    variables = {"params": {**variables["params"], "short_conv": kernel + 0.3}}
    out = layer.apply(variables, x, 0, token_mask=mask)[0]
    noisy = x.at[1, :5].set(jnp.asarray(rng.standard_normal((5, cfg.hidden_size)), jnp.float32))
    np.testing.assert_allclose(layer.apply(variables, noisy, 0, token_mask=mask)[0][1, 5:], out[1, 5:],
                               rtol=1e-6, atol=1e-6 * np.abs(out).max())


def test_inference_with_a_state_is_refused(models, rng):
    cfg, conv_cfg, params = models
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)))
    with pytest.raises(ValueError, match=r"M1Config.lightning_short_conv=4 is training-only.*last W-1 inputs"):
        M1ForCausalLM(conv_cfg).apply({"params": params}, ids, cache=init_cache(conv_cfg, 2, 16))
    layer, x = LightningAttention(conv_cfg), jnp.zeros((2, 1, cfg.hidden_size))
    variables = layer.init(jax.random.key(0), x, 0)
    state = jnp.zeros((2, cfg.num_heads, cfg.head_dim, cfg.head_dim))
    with pytest.raises(ValueError, match=r"M1Config.lightning_short_conv=4 is training-only"):
        layer.apply(variables, x, 0, state=state)  # one decode step


@pytest.mark.parametrize("value", [-1, 2.0, True, "4", None])
def test_config_accepts_only_a_non_negative_width(value):
    with pytest.raises(ValueError, match=r"M1Config.lightning_short_conv must be a non-negative integer .*0 for none"):
        M1Config.from_preset("tiny", lightning_short_conv=value)
    assert M1Config.from_preset("tiny", lightning_short_conv=np.int64(3)).lightning_short_conv == 3


def test_no_hf_config_describes_it_and_reading_one_gives_none():
    tiny = M1Config.from_preset("tiny")
    conv = tiny.replace(lightning_short_conv=WIDTH)
    with pytest.raises(ValueError, match=r"M1Config.lightning_short_conv=4: transformers' MiniMax has no short "
                                         r"convolution.*set it to 0 to export"):
        conv.to_hf()
    assert M1Config.from_hf(tiny.to_hf()).lightning_short_conv == 0
    assert architecture_differences(tiny, conv) == ["lightning_short_conv"]  # a resume onto it is refused


def test_parameter_helpers_see_the_kernel(models):
    cfg, conv_cfg, params = models
    names = param_logical_axes(conv_cfg)
    assert names["groups"]["layer_0"]["attn"]["short_conv"] == ("layers", None, "heads")
    assert param_logical_axes(params) == names == param_logical_axes(abstract_params(conv_cfg))
    assert "short_conv" not in param_logical_axes(cfg)["groups"]["layer_0"]["attn"]
    extra = count_params(conv_cfg)["lightning_attention"] - count_params(cfg)["lightning_attention"]
    assert extra == cfg.layer_types.count("lightning") * WIDTH * 3 * cfg.num_heads * cfg.head_dim
    sharded = plan(conv_cfg, {"tensor": 2}, batch_size=2, seq_len=64, platform="cpu")
    assert sharded["total"] > 0
