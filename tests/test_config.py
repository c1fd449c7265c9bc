"""M1Config: presets, both config.json flavours, round trips, and every construction error."""
import dataclasses
import json
import os

import pytest

from m1jax.config import PRESETS, M1Config, deepnorm_alpha, m1_schedule

M1_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "minimax-m1", "config.json")


@pytest.mark.skipif(not os.path.exists(M1_CONFIG), reason="released M1 config.json not present")
def test_released_m1_config_is_the_80k_preset():
    loaded = M1Config.from_hf(M1_CONFIG)
    assert loaded == M1Config.from_preset("minimax-m1-80k")
    assert loaded.num_layers == 80 and loaded.layer_period == 8 and loaded.num_groups == 10
    assert loaded.layer_types.count("softmax") == 10


def test_m1_facts():
    cfg = M1Config.from_preset("minimax-m1-80k")
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (6144, 64, 8, 128)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_size, cfg.vocab_size) == (32, 2, 9216, 200064)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "softmax"] == list(range(7, 80, 8))
    assert cfg.rotary_dim == 64 and cfg.rope_theta == 1e7
    assert cfg.lightning_alpha == pytest.approx(3.5565588200778455, rel=1e-12)
    assert M1Config.from_preset("minimax-m1-40k") == M1Config.from_preset("minimax-text-01") == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_transformers_flavour_round_trip(name, tmp_path):
    cfg = M1Config.from_preset(name)
    cfg.save_hf(tmp_path)
    assert M1Config.from_hf(tmp_path) == cfg
    assert M1Config.from_hf(cfg.to_hf()) == cfg


def test_research_presets():
    tiny = M1Config.from_preset("tiny")
    assert "softmax" in tiny.layer_types and tiny.num_experts >= 4 and tiny.num_groups > 1
    research = M1Config.from_preset("research-1b")
    assert research.layer_types == m1_schedule(research.num_layers)


def test_original_flavour_fields():
    raw = {"attn_type_list": [0, 1, 0], "num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4,
           "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 100, "num_local_experts": 4,
           "num_experts_per_tok": 1, "intermediate_size": 32, "rotary_dim": 8, "rope_theta": 5000.0,
           "postnorm": True, "layernorm_linear_attention_alpha": 1.5, "layernorm_full_attention_beta": 0.5,
           "layernorm_mlp_alpha": 2.0}
    cfg = M1Config.from_hf(raw)
    assert cfg.layer_types == ("lightning", "softmax", "lightning")
    assert (cfg.lightning_alpha, cfg.softmax_beta, cfg.mlp_alpha, cfg.mlp_beta) == (1.5, 0.5, 2.0, 1.0)
    assert cfg.rotary_dim == 8 and cfg.layer_period == 3 and cfg.num_groups == 1
    back = M1Config.from_hf(cfg.to_hf())
    assert back == cfg


def test_transformers_partial_rotary_factor():
    raw = M1Config.from_preset("tiny").to_hf()
    raw["rope_parameters"]["partial_rotary_factor"] = 0.25
    assert M1Config.from_hf(raw).rotary_dim == 4


@pytest.mark.parametrize("changes, message", [
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"experts_per_token": 9}, "exceeds num_experts"),
    ({"rotary_dim": 7}, "rotary_dim"),
    ({"rotary_dim": 64}, "rotary_dim"),
    ({"layer_types": ("lightning", "mamba")}, "unknown kinds"),
    ({"layer_types": ()}, "empty"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"rope_theta": -1.0}, "rope_theta"),
])
def test_inconsistent_configs_fail_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        M1Config.from_preset("tiny", **changes)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(postnorm=False), "postnorm"),
    (lambda r: r.update(shared_intermediate_size=128), "shared expert"),
    (lambda r: r.update(num_hidden_layers=5), "layer types"),
    (lambda r: r.update(tie_word_embeddings=True), "ties"),
    (lambda r: r.update(hidden_act="gelu"), "silu"),
    (lambda r: r.pop("attn_type_list"), "neither"),
])
def test_bad_original_configs(edit, message):
    raw = {"attn_type_list": [0, 1], "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
           "head_dim": 16, "vocab_size": 50, "num_local_experts": 2, "num_experts_per_tok": 1,
           "intermediate_size": 16, "postnorm": True, "num_key_value_heads": 1, "rotary_dim": 8,
           "rope_theta": 10000.0}
    edit(raw)
    with pytest.raises(ValueError, match=message):
        M1Config.from_hf(raw)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        M1Config.from_preset("m1-huge")
    with pytest.raises(FileNotFoundError):
        M1Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"layer_types": ["linear_attention"]}))
    with pytest.raises(ValueError, match="lacks"):
        M1Config.from_hf(tmp_path)


def test_layer_period_and_slopes():
    cfg = M1Config.from_preset("tiny", layer_types=("lightning", "softmax", "lightning", "lightning", "softmax"))
    assert cfg.layer_period == 5 and cfg.num_groups == 1
    slopes = M1Config.from_preset("minimax-m1-80k").lightning_slopes()
    assert slopes.shape == (80, 64)
    assert slopes[0, 0] == pytest.approx(2 ** (-8 / 64) * (1 + 1e-5), rel=1e-6)
    assert slopes[40, 63] == pytest.approx(2 ** -8.0 * (1 - 40 / (79 + 1e-5) + 1e-5), rel=1e-6)
    assert (slopes[:-1] > slopes[1:]).all()  # earlier layers decay faster
    assert deepnorm_alpha(80) == pytest.approx(3.5565588200778455)


@pytest.mark.parametrize("flavour", ["original", "transformers"])
@pytest.mark.parametrize("field", ["rotary", "theta", "num_key_value_heads"])
def test_fields_that_define_the_model_are_required(flavour, field, tmp_path):
    """No silent default that changes the model: a missing rotary dimension, RoPE base or kv-head count is an error
    naming the field (it used to become the whole head, 1e6 or num_heads without a word)."""
    cfg = M1Config.from_preset("tiny")
    raw = cfg.to_hf()
    if flavour == "original":
        raw.pop("layer_types")
        raw.pop("rope_parameters")
        raw.update(attn_type_list=[int(t == "softmax") for t in cfg.layer_types], postnorm=True,
                   rotary_dim=cfg.rotary_dim, rope_theta=cfg.rope_theta,
                   **{f"layernorm_{theirs}_{ab}": raw.pop(f"{short}_{ab}_factor")
                      for theirs, short in (("linear_attention", "linear_attn"), ("full_attention", "full_attn"),
                                            ("mlp", "mlp")) for ab in ("alpha", "beta")})
    assert M1Config.from_hf(raw) == cfg
    name = {"rotary": "rotary_dim" if flavour == "original" else "partial_rotary_factor",
            "theta": "rope_theta", "num_key_value_heads": "num_key_value_heads"}[field]
    if field == "num_key_value_heads":
        raw.pop(name)
    elif flavour == "original":
        raw.pop(name)
    else:
        raw["rope_parameters"].pop(name)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json .*lacks '{name}'"):
        M1Config.from_hf(tmp_path)
    if flavour == "transformers" and field != "num_key_value_heads":
        raw.pop("rope_parameters")
        with pytest.raises(ValueError, match="lacks '(partial_rotary_factor|rope_theta)'"):
            M1Config.from_hf(raw)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"layer_types": [')
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        M1Config.from_hf(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path} must hold a JSON object"):
        M1Config.from_hf(path)
    raw = M1Config.from_preset("tiny").to_hf()
    raw["hidden_size"] = "64"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{path} field 'hidden_size' must be an integer, got '64'"):
        M1Config.from_hf(path)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("field", ["hidden_size", "rope_theta"])
def test_non_finite_numbers_name_the_field(tmp_path, field, value):
    # found by the fuzzer: block_size = Infinity raised OverflowError from deep inside the loader
    raw = M1Config.from_preset("tiny").to_hf()
    (raw["rope_parameters"] if field == "rope_theta" else raw)[field] = value  # this flavour keeps theta there
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"field '{field}' must be"):
        M1Config.from_hf(path)


def test_runtime_policy_never_makes_another_architecture():
    from m1jax.config import TRAINING_FIELDS, RunPolicy, architecture_differences, same_architecture
    tiny = M1Config.from_preset("tiny")
    policy_fields = {f.name for f in dataclasses.fields(RunPolicy)}
    assert not policy_fields & {f.name for f in dataclasses.fields(M1Config)}  # run-time choices are not the model
    coefficients = dict(router_aux_loss_coef=0.01, router_z_loss_coef=1e-3, initializer_range=0.1)
    assert set(coefficients) == set(TRAINING_FIELDS)
    assert same_architecture(tiny, tiny.replace(**coefficients))
    assert M1Config.from_hf(tiny.replace(**coefficients).to_hf("bfloat16")) == tiny.replace(**coefficients)
    assert same_architecture(M1Config.from_hf(tiny.replace(**coefficients).to_hf()), tiny)
    for change in ({"num_kv_heads": 1}, {"rotary_dim": 4}, {"layer_types": ("lightning",) * 4},
                   {"mlp_alpha": 1.0}, {"rms_norm_eps": 1e-6}, {"rope_theta": 1e6}):
        assert not same_architecture(tiny, tiny.replace(**change))
        assert architecture_differences(tiny, tiny.replace(**change)) == list(change)


@pytest.mark.parametrize("changes, message", [
    ({"param_dtype": "float64"}, "RunPolicy.param_dtype='float64'; use one of"),
    ({"compute_dtype": "int8"}, "RunPolicy.compute_dtype='int8'; use one of"),
    ({"float32_lm_head": 1}, "RunPolicy.float32_lm_head=1; pass True or False"),
    ({"expert_threshold": 1.0}, r"RunPolicy.expert_threshold=1.0; pass a number in \[0, 1\)"),
    ({"expert_threshold": True}, "RunPolicy.expert_threshold=True"),
    ({"capacity_factor": 0.0}, "RunPolicy.capacity_factor=0.0; pass a positive number, or None"),
    ({"capacity_factor": float("inf")}, "RunPolicy.capacity_factor=inf"),
    ({"block_size": 0}, "RunPolicy.block_size=0; pass a positive integer, or None"),
    ({"remat": "some"}, "RunPolicy.remat='some'; choose one of"),
])
def test_bad_run_policies_fail_at_construction_naming_the_field(changes, message):
    from m1jax.config import RunPolicy
    with pytest.raises(ValueError, match=message):
        RunPolicy(**changes)


def test_config_json_run_time_entries_do_not_reach_the_architecture():
    """dtype and block_size are how a file's weights are stored and how the reference computes: the same model
    whatever they say; an older file's run-time "m1jax" keys (compute_dtype, expert_threshold, ...) are ignored."""
    from m1jax.config import REFERENCE_BLOCK_SIZE, stored_dtype
    tiny = M1Config.from_preset("tiny")
    raw = tiny.to_hf("bfloat16")
    assert raw["dtype"] == "bfloat16" and stored_dtype(raw) == "bfloat16" and raw["block_size"] == REFERENCE_BLOCK_SIZE
    raw.update(block_size=16, dtype="float16")
    raw["m1jax"].update(compute_dtype="bfloat16", expert_threshold=0.3, capacity_factor=1.0, float32_lm_head=False)
    assert M1Config.from_hf(raw) == tiny and stored_dtype(raw) == "float16"
    assert stored_dtype({"torch_dtype": "bfloat16"}) == "bfloat16" and stored_dtype({"dtype": "int4"}) == "float32"
    with pytest.raises(ValueError, match="to_hf.dtype='float64'"):
        tiny.to_hf("float64")


def test_run_time_choices_given_to_the_config_say_where_they_go():
    with pytest.raises(ValueError, match=r"\['compute_dtype'\] are run-time policy.*RunPolicy\(compute_dtype=\.\.\.\)"):
        M1Config.from_preset("tiny", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"RunPolicy\(expert_threshold=\.\.\.\)"):
        M1Config.from_preset("tiny").replace(expert_threshold=0.2)
