"""HF checkpoints: parity with transformers' MiniMaxForCausalLM on its own random checkpoints, round trips, errors.

Fixtures (tests/fixtures/parity/<case>/) are written by tests/fixtures/make_parity_fixtures.py in a separate
torch venv (`make fixtures`); transformers' RoPE is patched there to the released partial rotary.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from safetensors import safe_open
from safetensors.flax import save_file

from m1jax import M1ForCausalLM, load_pretrained, save_pretrained
from m1jax.checkpoint.names import DERIVED_BUFFERS

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "parity")
CASES = sorted(os.listdir(FIXTURES))
REF_PYTHON = os.path.join(ROOT, ".refvenv", "bin", "python")


def relative_error(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def forward(config, params, ids):
    return jax.jit(lambda p, i: M1ForCausalLM(config).apply({"params": p}, i).logits)(params, ids)


def tensors_of(directory):
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "flax") as f:
                out.update({k: np.asarray(f.get_tensor(k)) for k in f.keys()})
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    directory = os.path.join(FIXTURES, case)
    expected = np.load(os.path.join(directory, "expected.npz"))
    config, params = load_pretrained(directory)
    logits = forward(config, params, jnp.asarray(expected["input_ids"]))
    err = relative_error(logits, expected["logits"])
    assert err < 1e-5, f"{case}: relative error {err:.2e}"


def test_fixtures_cover_the_required_configurations():
    configs = {case: load_pretrained(os.path.join(FIXTURES, case))[0] for case in CASES}
    inputs = {case: np.load(os.path.join(FIXTURES, case, "expected.npz"))["input_ids"] for case in CASES}
    assert any(c.layer_period == 8 and c.layer_types.count("softmax") == 1 for c in configs.values()), "M1 schedule"
    blocks = {case: json.load(open(os.path.join(FIXTURES, case, "config.json")))["block_size"] for case in CASES}
    assert any(inputs[k].shape[1] > blocks[k] and inputs[k].shape[1] % blocks[k] for k in configs), "reference block"
    assert any(1 < c.num_kv_heads < c.num_heads for c in configs.values()), "GQA"
    assert any(c.num_kv_heads == 1 for c in configs.values()), "multi-query"
    assert any(c.hidden_size != c.num_heads * c.head_dim for c in configs.values())
    assert any(c.rotary_dim < c.head_dim for c in configs.values()), "partial rotary"
    assert any(c.rotary_dim == c.head_dim for c in configs.values()), "full rotary (no reference patch)"
    assert any(c.lightning_alpha != 1 and c.mlp_beta != 1 for c in configs.values()), "alpha/beta not 1"
    assert {c.experts_per_token for c in configs.values()} >= {1, 2}, "top-1 and top-2"


@pytest.mark.parametrize("case", ["mqa_odd"])
def test_load_save_load_is_identical_and_matches_transformers_file(case, tmp_path):
    directory = os.path.join(FIXTURES, case)
    config, params = load_pretrained(directory)
    save_pretrained(tmp_path, config, params)
    config2, params2 = load_pretrained(tmp_path)
    assert config2 == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    ours, theirs = tensors_of(tmp_path), tensors_of(directory)
    theirs = {k: v for k, v in theirs.items() if not DERIVED_BUFFERS.match(k)}
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.mark.skipif(not os.path.exists(REF_PYTHON), reason="reference venv (.refvenv, `make fixtures`) not present")
def test_our_save_loads_in_transformers_with_the_same_logits(tmp_path):
    directory = os.path.join(FIXTURES, "m1_schedule")
    config, params = load_pretrained(directory)
    params = jax.tree.map(lambda x: x * 1.01, params)  # a checkpoint transformers has not seen
    save_pretrained(tmp_path / "ckpt", config, params, max_shard_bytes=1 << 20)
    ids = np.load(os.path.join(directory, "expected.npz"))["input_ids"][:, :200]
    np.savez(tmp_path / "in.npz", input_ids=ids)
    script = os.path.join(ROOT, "tests", "fixtures", "transformers_logits.py")
    subprocess.run([REF_PYTHON, script, str(tmp_path / "ckpt"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True, capture_output=True)
    theirs = np.load(tmp_path / "out.npz")["logits"]
    assert relative_error(forward(config, params, jnp.asarray(ids)), theirs) < 1e-5


def test_sharded_save_and_index(tmp_path):
    config, params = load_pretrained(os.path.join(FIXTURES, "tiny_block"))
    files = save_pretrained(tmp_path, config, params, max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(files) - {"model.safetensors.index.json"}
    _, again = load_pretrained(tmp_path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)
    save_pretrained(tmp_path, config, params)  # a later single-file save removes the stale shards
    assert sorted(n for n in os.listdir(tmp_path) if "safetensors" in n) == ["model.safetensors"]


def test_transformers_packed_expert_names_load(tmp_path):
    directory = os.path.join(FIXTURES, "tiny_block")
    config, params = load_pretrained(directory)
    tensors = tensors_of(directory)
    packed = {}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        experts = range(config.num_experts)
        packed[f"model.layers.{layer}.mlp.gate.weight"] = tensors.pop(prefix + "gate.weight")
        packed[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([tensors.pop(f"{prefix}experts.{e}.w1.weight"),
                             tensors.pop(f"{prefix}experts.{e}.w3.weight")]) for e in experts])
        packed[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack(
            [tensors.pop(f"{prefix}experts.{e}.w2.weight") for e in experts])
    tensors.update(packed)
    shutil.copy(os.path.join(directory, "config.json"), tmp_path)
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    _, again = load_pretrained(tmp_path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)


def rewrite(tmp_path, edit):
    directory = os.path.join(FIXTURES, "tiny_block")
    tensors = tensors_of(directory)
    edit(tensors)
    shutil.copy(os.path.join(directory, "config.json"), tmp_path)
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_fail_with_names(tmp_path):
    rewrite(tmp_path, lambda t: t.pop("model.layers.1.input_layernorm.weight"))
    with pytest.raises(ValueError, match=r"1 missing tensors \[.model.layers.1.input_layernorm.weight.\]"):
        load_pretrained(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="unexpected tensors.*model.layers.0.extra.weight"):
        load_pretrained(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint shape \(7,\), config expects \(\d+,\)"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nowhere")


def test_bfloat16_load_keeps_router_float32():
    config, params = load_pretrained(os.path.join(FIXTURES, "tiny_block"), dtype="bfloat16")
    assert params["groups"]["layer_0"]["moe"]["w1"].dtype == jnp.bfloat16
    assert params["groups"]["layer_0"]["moe"]["gate"].dtype == jnp.float32


def test_save_rejects_params_that_do_not_match_the_config(tmp_path):
    config, params = load_pretrained(os.path.join(FIXTURES, "tiny_block"))
    params["final_norm"]["scale"] = params["final_norm"]["scale"][:-1]
    with pytest.raises(ValueError, match="final_norm"):
        save_pretrained(tmp_path, config, params)
