"""Random configurations against transformers: each draw's config, weights and tokens are new to both sides.

The committed fixtures pin four hand-picked cases; this sweep draws many more (any schedule, heads that do not
divide the width, one kv head, top-1..3 of 1..8 experts, rotary 1/4..1 of the head, alpha/beta != 1, blocks smaller
and larger than T, T = 1) from seeds, saves our random checkpoint, runs transformers' MiniMaxForCausalLM on it in
the reference venv in float32 and float64, and compares our float32 logits with the float64 ones. Runs where
.refvenv exists (`make fixtures`); skipped elsewhere.
"""
import json
import os
import subprocess

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m1jax import M1Config, M1ForCausalLM, save_pretrained
from m1jax.model import init_params

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
REF_PYTHON = os.path.join(ROOT, ".refvenv", "bin", "python")
SCRIPT = os.path.join(ROOT, "tests", "fixtures", "transformers_logits.py")
SEEDS = (*range(12), 41, 45)  # 41, 45: the two draws of range(48) whose float32 rounding (both sides) exceeds 1e-4


def random_case(seed: int):
    """(config, params, ids): a configuration drawn from the whole space M1Config accepts, wide random weights."""
    rng = np.random.default_rng(seed)
    heads = int(rng.integers(1, 7))
    kv_heads = int(rng.choice([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = int(rng.choice([8, 16, 24, 32]))
    rotary_dim = int(rng.choice([r for r in range(2, head_dim + 1, 2) if head_dim % r == 0 or r == head_dim]))
    layers = int(rng.integers(1, 7))
    experts = int(rng.integers(1, 9))
    fields = dict(
        vocab_size=int(rng.integers(40, 200)), hidden_size=int(rng.choice([24, 32, 48, 64, 80])),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim,
        num_experts=experts, experts_per_token=int(rng.integers(1, min(experts, 3) + 1)),
        expert_size=int(rng.integers(4, 65)),
        layer_types=tuple(rng.choice(["lightning", "softmax"], size=layers).tolist()),
        rope_theta=float(rng.choice([500.0, 1e4, 1e6, 1e7])), rms_norm_eps=float(rng.choice([1e-5, 1e-6])))
    block_size = int(rng.choice([4, 8, 16, 256]))  # transformers' kernel block (run-time): written to its file
    scales = {f"{part}_{ab}": float(rng.uniform(0.6, 2.0)) for part in ("lightning", "softmax", "mlp")
              for ab in ("alpha", "beta")}
    config = M1Config(**fields, **scales, initializer_range=0.25)
    params = init_params(config, jax.random.key(seed))
    # Norm gains away from 1, so a norm applied to the wrong tensor shows.
    gains = iter(jax.random.split(jax.random.key(seed + 1000), len(jax.tree.leaves(params))))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * jax.random.uniform(next(gains), x.shape, x.dtype, 0.5, 1.5)
        if "scale" in jax.tree_util.keystr(path) else x, params)
    batch, length = int(rng.integers(1, 4)), (1 if rng.random() < 0.15 else int(rng.integers(2, 90)))
    return config, params, rng, batch, length, block_size  # seeds are fixed: a routing near-tie would show on every run


@pytest.mark.skipif(not os.path.exists(REF_PYTHON), reason="reference venv (.refvenv, `make fixtures`) not present")
def test_random_configurations_match_transformers(tmp_path):
    report = []
    inputs = {}
    for seed in SEEDS:
        config, params, rng, batch, length, block_size = random_case(seed)
        ids = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
        save_pretrained(tmp_path / str(seed), config, params)
        path = tmp_path / str(seed) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "block_size": block_size}))
        np.savez(tmp_path / f"{seed}.npz", input_ids=np.asarray(ids))
        inputs[seed] = (config, params, ids)
    for seed, (config, params, ids) in inputs.items():
        subprocess.run([REF_PYTHON, SCRIPT, str(tmp_path / str(seed)), str(tmp_path / f"{seed}.npz"),
                        str(tmp_path / f"{seed}.out.npz"), "--float64"], check=True, capture_output=True)
        with np.load(tmp_path / f"{seed}.out.npz") as theirs:
            theirs, exact = theirs["logits"], theirs["logits_float64"]
        ours = np.asarray(M1ForCausalLM(config).apply({"params": params}, ids).logits, np.float64)
        scale = np.abs(exact).max()
        report.append((seed, np.abs(ours - exact).max() / scale, np.abs(theirs - exact).max() / scale, config))
    print("seed, max |ours - float64| and |transformers float32 - float64| / max |float64|:",
          [(seed, f"{ours:.1e}", f"{theirs:.1e}") for seed, ours, theirs, _ in report])
    # Wide weights and alpha up to 2 over 6 layers amplify float32 rounding to ~1e-5, in some draws past 1e-4 on
    # both sides (seeds 41 and 45 of range(48): ours 9e-5 and 9e-5 from float64, transformers' float32 1.2e-4 and
    # 2.8e-4): so ours must be within 1e-4 of the float64 run or no further from it than transformers' own float32
    # run is. A formula slip is >= 1e-3.
    failures = [(seed, ours, theirs, json.dumps(config.to_hf())) for seed, ours, theirs, config in report
                if ours > max(1e-4, 1.5 * theirs)]
    assert not failures, failures
