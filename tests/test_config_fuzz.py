"""Property-based fuzzing of config.json loading (hypothesis): random, partial and malformed configs, in both
flavours and as raw bytes. Every outcome is either a config equal to what the file says or a ValueError /
FileNotFoundError naming config.json (and the field); never another exception type, a hang or a silent default for
a field that defines the model."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m1jax.config import M1Config, m1_schedule

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Fields whose absence would change the model: they must be present (no default)
REQUIRED = {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_local_experts",
            "num_experts_per_tok", "intermediate_size", "num_hidden_layers", "rope_parameters", "rotary_dim",
            "rope_theta", "attn_type_list", "layer_types"}


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    experts = draw(st.integers(1, 6))
    layers = draw(st.integers(1, 9))
    return M1Config(vocab_size=draw(st.integers(2, 1000)), hidden_size=draw(st.integers(1, 64)), num_heads=heads,
                    num_kv_heads=kv, head_dim=head_dim, num_experts=experts,
                    experts_per_token=draw(st.integers(1, experts)), expert_size=draw(st.integers(1, 64)),
                    layer_types=m1_schedule(layers, draw(st.integers(1, 8))),
                    rotary_dim=draw(st.sampled_from([d for d in (2, 4, 8, 16) if d <= head_dim])),
                    rope_theta=draw(st.floats(1.0, 1e7)), mlp_alpha=draw(st.floats(0.5, 4.0)))


def original_flavour(cfg: M1Config) -> dict:
    raw = cfg.to_hf()
    for ours, theirs in (("linear_attn", "linear_attention"), ("full_attn", "full_attention"), ("mlp", "mlp")):
        for ab in ("alpha", "beta"):
            raw[f"layernorm_{theirs}_{ab}"] = raw.pop(f"{ours}_{ab}_factor")
    raw.pop("rope_parameters")
    raw.pop("layer_types")
    raw.update(attn_type_list=[int(t == "softmax") for t in cfg.layer_types], postnorm=True,
               rotary_dim=cfg.rotary_dim, rope_theta=cfg.rope_theta)
    return raw


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 65, 2 ** 65), st.floats(), st.text(max_size=4),
                 st.lists(st.integers(-2, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=2))


def _check_error(err: Exception, where: str) -> None:
    assert type(err) in (ValueError, FileNotFoundError), f"{type(err).__name__}: {err}"
    assert where in str(err), str(err)


@FUZZ
@given(configs(), st.booleans(), st.data())
def test_fuzz_fields(tmp_path, cfg, original, data):
    raw = original_flavour(cfg) if original else cfg.to_hf()
    assert M1Config.from_hf(raw) == cfg
    keys = sorted(raw)
    removed = data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True))
    changed = data.draw(st.dictionaries(st.sampled_from(keys), JUNK, max_size=3))
    for key in removed:
        raw.pop(key)
    raw.update({k: v for k, v in changed.items() if k not in removed})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    try:
        loaded = M1Config.from_hf(path)
    except Exception as err:  # noqa: BLE001 - the type is the property under test
        _check_error(err, str(path))
        return
    assert not REQUIRED & set(removed), f"accepted a config without {REQUIRED & set(removed)}"
    assert M1Config.from_hf(loaded.to_hf()) == loaded  # whatever was accepted is a consistent config


@FUZZ
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode)), st.booleans())
def test_fuzz_bytes(tmp_path, content, truncate_real):
    if truncate_real:  # a real config cut short (a partial download)
        text = json.dumps(M1Config.from_preset("tiny").to_hf()).encode()
        content = text[:len(content) % len(text)]
    path = tmp_path / "config.json"
    path.write_bytes(content)
    try:
        M1Config.from_hf(tmp_path)
    except Exception as err:  # noqa: BLE001
        _check_error(err, str(path))
    else:
        raise AssertionError(f"accepted {content!r}")


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(REQUIRED | {"head_dim", "postnorm", "m1jax", "dtype"})), JUNK,
                       max_size=8))
def test_fuzz_random_dicts(tmp_path, raw):
    try:
        M1Config.from_hf(raw)
    except Exception as err:  # noqa: BLE001
        _check_error(err, "config.json")
