"""Parameter counts from abstract shapes (no memory): total, active per token, and a per-component breakdown.

"total" counts every parameter (embedding and lm_head included); "active" counts those one token uses, without
embedding and lm_head (the paper's convention): all attention, norms and routers, and k of E experts per layer.
MiniMax-M1: 456,089,655,296 total, 45,944,920,064 active.
"""
import jax
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
