"""Parameter counts from abstract shapes (no memory): total, active per token, and a per-component breakdown.

"total" counts every parameter (embedding and lm_head included); "active" counts those one token uses, without
embedding and lm_head (the paper's convention): all attention, norms and routers, and k of E experts per layer.
MiniMax-M1: 456,089,655,296 total, 45,944,920,064 active.
"""
import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import LIGHTNING, M1Config
from m1jax.model import abstract_params

COMPONENTS = ("embedding", "lm_head", "lightning_attention", "softmax_attention", "router", "experts", "norms")


def _component(config: M1Config, path: tuple[str, ...]) -> str:
    if path[0] == "embed":
        return "embedding"
    if path[0] == "lm_head":
        return "lm_head"
    if path[0] == "final_norm" or path[-2].endswith("norm") and path[-3] != "attn":
        return "norms"
    if "moe" in path:
        return "router" if path[-1] == "gate" else "experts"
    position = int(path[1].removeprefix("layer_"))
    return "lightning_attention" if config.layer_types[position] == LIGHTNING else "softmax_attention"


def count_params(config: M1Config) -> dict[str, int]:
    """{"total", "active", "embedding", "lm_head", "lightning_attention", "softmax_attention", "router", "experts",
    "norms", "active_experts"} as Python ints."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]:
        path = tuple(k.key for k in key_path)
        counts[_component(config, path)] += int(np.prod(leaf.shape))
    total = sum(counts.values())
    active_experts = counts["experts"] * config.experts_per_token // config.num_experts
    active = total - counts["embedding"] - counts["lm_head"] - counts["experts"] + active_experts
    return {"total": total, "active": active, **counts, "active_experts": active_experts}


def params_table(config: M1Config) -> str:
    """A printable per-component table."""
    counts = count_params(config)
    rows = [(name, counts[name]) for name in COMPONENTS + ("active_experts",)] + [
        ("total", counts["total"]), ("active (per token, no embedding/lm_head)", counts["active"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'component':<{width}}  {'parameters':>17}  {'share':>6}"]
    for name, n in rows:
        lines.append(f"{name:<{width}}  {n:>17,}  {100 * n / counts['total']:>5.1f}%")
    return "\n".join(lines)


def draw_params(config: M1Config, seed: int):
    """Random parameters of `config` drawn with numpy from the abstract shapes (no init forward to compile, so fast
    on the CPU): matrices N(0, 1/fan_in), norm scales U(0.5, 1.5), embeddings N(0, 1). Wider than the model's 0.02
    init, so that logits and routing differ clearly between tokens: for checks and tests, not for training."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            values = rng.uniform(0.5, 1.5, leaf.shape)
        elif "embed" in name:
            values = rng.standard_normal(leaf.shape)
        else:
            values = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))
