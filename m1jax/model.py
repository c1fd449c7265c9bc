"""M1ForCausalLM: embedding, the layer schedule scanned in repeating groups, final norm, float32 lm_head.

`M1ForCausalLM(config, policy=RunPolicy(...), mesh=...)`: the config is the architecture (what a checkpoint is), the
policy how this run computes it (dtypes, lm_head precision, expert threshold and capacity, kernel block, remat);
every layer reads its run-time choices from the policy.

M1's 80 layers repeat a group of 7 lightning + 1 softmax layers 10 times; the group is one `nn.scan` body, so the full
model traces and compiles as one group. Schedules without a period scan one group of all layers. Parameters of a
group position are stacked with a leading axis G (number of groups): params["groups"]["layer_j"][...] has shape
(G, ...), holding global layers j, p + j, 2p + j, ... for period p.

Inference passes a cache (`m1jax.inference.cache.Cache`) with one entry per layer (cache.layers[l], global layer
l). Its `index` () is the next cache slot (all rows advance together) and `start` (B,) the first real slot of each
left-padded row; positions then count from each row's start, and the output carries the updated cache. With a
cache the groups run unrolled (a Python loop over g with the stacked parameters sliced at g) rather than scanned:
each layer's cache is then its own buffer, updated in place, where a scan would copy every layer's cache through
its stacked inputs and outputs on every step.
"""
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import REMAT_CHOICES, M1Config, RunPolicy
from m1jax.layers.block import DecoderLayer
from m1jax.layers.embedding import Embed
from m1jax.layers.moe_core import GroupedMatmul
from m1jax.layers.norms import RMSNorm
from m1jax.layers.partitioning import Module, logical_axes, named
from m1jax.layers.rope import segment_positions

REMAT_POLICIES = dict(zip(REMAT_CHOICES, (None,  # RunPolicy.remat -> jax.checkpoint policy
                                           jax.checkpoint_policies.nothing_saveable,
                                           jax.checkpoint_policies.dots_with_no_batch_dims_saveable)))


@flax.struct.dataclass
class M1Output:
    """logits (B, T, V) float32; aux_loss: mean load-balancing loss over layers; z_loss: mean router z-loss;
    routing: per-layer statistics, each (L, ...) in global layer order; cache: the updated inference cache (None
    without one)."""
    logits: jax.Array
    aux_loss: jax.Array
    z_loss: jax.Array
    routing: dict[str, jax.Array]
    cache: Any = None


class LayerGroup(Module):
    """One period of the layer schedule (M1: 7 lightning + 1 softmax). Carry h: (B, T, hidden).

    Returns (h, (routing statistics, new layer caches or None))."""

    config: M1Config
    policy: RunPolicy = RunPolicy()
    grouped_matmul: GroupedMatmul | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None

    @nn.compact
    def __call__(self, h, group_index, positions, segment_ids, layer_caches=None, cache_slots=None):
        cfg = self.config
        period = cfg.layer_period
        stats, new_caches = [], {}
        for j, kind in enumerate(cfg.layer_types[:period]):
            name = f"layer_{j}"
            layer = DecoderLayer(cfg, kind, self.policy, self.grouped_matmul, self.mesh, name=name)
            layer_cache = None if layer_caches is None else layer_caches[name]
            h, layer_stats, new_caches[name] = layer(h, group_index * period + j, positions, segment_ids,
                                                     layer_cache, cache_slots)
            stats.append(layer_stats)
        stats = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
        return h, (stats, None if layer_caches is None else new_caches)


class M1ForCausalLM(Module):
    """input_ids (B, T) int -> M1Output. Optional segment_ids (B, T) for packed rows (0 marks padding) and positions
    (B, T) (default: restart at each segment, or 0..T-1).

    With `cache`, input_ids fill cache slots index .. index+T-1: positions default to slot - start (0 at each row's
    first real token), slots before a row's start are padding, and segment_ids, if given, is a token mask (0 marks
    more padding, e.g. finished rows). last_logits_only: compute the lm_head for the last position only (B, 1, V).
    Concrete input_ids outside [0, vocab_size) raise ValueError; traced ones give NaN logits (see check_token_ids).
    """

    config: M1Config
    policy: RunPolicy = RunPolicy()
    grouped_matmul: GroupedMatmul | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None  # MoE layers dispatch expert-parallel over it

    @nn.compact
    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: Any = None, last_logits_only: bool = False) -> M1Output:
        cfg, policy = self.config, self.policy
        check_token_ids(input_ids, cfg.vocab_size)
        if not isinstance(policy, RunPolicy):
            raise ValueError(f"M1ForCausalLM(policy=...) takes a RunPolicy, got {type(policy).__name__}; build one "
                             "with m1jax.config.RunPolicy(compute_dtype=..., ...)")
        if cache is not None:
            if self.is_initializing():
                raise ValueError("initialise the model without a cache; pass one to apply()")
            if len(cache.layers) != cfg.num_layers:
                raise ValueError(f"cache has {len(cache.layers)} layer entries, the config {cfg.num_layers}; build it "
                                 "with m1jax.inference.init_cache(config, ...)")
            slots = cache.index + jnp.arange(input_ids.shape[1], dtype=jnp.int32)
            real = slots[None, :] >= cache.start[:, None]
            if segment_ids is not None:
                real &= segment_ids != 0
            segment_ids = real.astype(jnp.int32)
            if positions is None:
                positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)
        if positions is None:
            positions = (segment_positions(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape))
        pdtype, cdtype = jnp.dtype(policy.param_dtype), jnp.dtype(policy.compute_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        # Traced ids cannot raise: a negative id is sent out of range too, so every bad id embeds as NaN (the gather's
        # fill value) instead of wrapping to the last row; checkify.index_checks turns it into an error.
        input_ids = jnp.where(input_ids < 0, cfg.vocab_size, input_ids)
        h = Embed(cfg.vocab_size, cfg.hidden_size, cdtype, pdtype, init, name="embed")(input_ids)

        if cache is None:
            group = LayerGroup
            if policy.remat != "none":
                group = nn.remat(LayerGroup, policy=REMAT_POLICIES[policy.remat], prevent_cse=False)
            scanned = nn.scan(group, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_groups,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            h, (stats, _) = scanned(cfg, policy, self.grouped_matmul, self.mesh, name="groups")(
                h, jnp.arange(cfg.num_groups, dtype=jnp.int32), positions, segment_ids)
            new_layers = None
        else:
            h, stats, new_layers = self._groups_unrolled(h, positions, segment_ids, cache)
        # (G, p, ...) -> (L, ...): global layer l = g * p + j
        routing = jax.tree.map(lambda x: x.reshape((cfg.num_layers,) + x.shape[2:]), stats)

        if last_logits_only:
            h = h[:, -1:]
        h = RMSNorm(cfg.rms_norm_eps, pdtype, name="final_norm")(h)
        head_dtype = jnp.float32 if policy.float32_lm_head else cdtype
        with jax.named_scope("lm_head"):
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=head_dtype, param_dtype=pdtype,
                              kernel_init=named(init, "embed", "vocab"), name="lm_head")(h.astype(head_dtype))
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(layers=new_layers, index=cache.index + input_ids.shape[1], fresh=False)
        return M1Output(logits=logits.astype(jnp.float32),
                        aux_loss=jnp.mean(routing["load_balancing_loss"]),
                        z_loss=jnp.mean(routing["z_loss"]),
                        routing=routing,
                        cache=new_cache)

    def _groups_unrolled(self, h, positions, segment_ids, cache):
        """The layer groups one after another, each with its slice of the stacked parameters and its layers' caches.
        Returns (h, stats (G, p, ...), new per-layer caches)."""
        cfg = self.config
        period = cfg.layer_period
        stacked = self.variables["params"]["groups"]
        group = LayerGroup(cfg, self.policy, self.grouped_matmul, self.mesh, parent=None)
        stats, new_layers = [], []
        for g in range(cfg.num_groups):
            group_params = jax.tree.map(lambda x, g=g: x[g], stacked)
            layer_caches = {f"layer_{j}": cache.layers[g * period + j] for j in range(period)}
            slots = (cache.index, cache.start, cache.fresh)
            h, (group_stats, new_caches) = group.apply({"params": group_params}, h, g, positions,
                                                       segment_ids, layer_caches, slots)
            stats.append(group_stats)
            new_layers += [new_caches[f"layer_{j}"] for j in range(period)]
        return h, jax.tree.map(lambda *xs: jnp.stack(xs), *stats), tuple(new_layers)


def check_token_ids(input_ids: Any, vocab_size: int, name: str = "input_ids") -> None:
    """Raise ValueError naming the first id outside [0, vocab_size) of concrete (B, T) integer ids.

    Traced ids (inside jit) are not checked here: the model then embeds an out-of-range id, negative or not, as NaN,
    so its logits are NaN rather than a plausible number; `jax.experimental.checkify.checkify(f,
    errors=checkify.index_checks)` around the jitted function reports it as an error.
    """
    if isinstance(input_ids, jax.core.Tracer):
        return
    if not hasattr(input_ids, "dtype") or not hasattr(input_ids, "ndim"):
        raise ValueError(f"{name} must be a (B, T) integer array, got {type(input_ids).__name__}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(input_ids.shape)}")
    if not getattr(input_ids, "is_fully_addressable", True):
        return  # spread over several hosts: each host checks its own batch before building the global array
    ids = np.asarray(input_ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}{list(first)} = {int(ids[first])} is outside [0, vocab_size={vocab_size}) "
                         f"({int(bad.sum())} such ids); the tokenizer or data does not match the model")


def init_params(config: M1Config, rng: jax.Array, seq_len: int = 8, policy: RunPolicy = RunPolicy()) -> Any:
    """Random parameters (a plain pytree) for `config`, in policy.param_dtype (the router float32)."""
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    return M1ForCausalLM(config, policy).init(rng, dummy)["params"]


def abstract_params(config: M1Config, policy: RunPolicy = RunPolicy()) -> Any:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct pytree) without allocating memory."""
    return jax.eval_shape(lambda rng: init_params(config, rng, policy=policy), jax.random.key(0))


def param_logical_axes(source: M1Config | Any) -> Any:
    """The logical axis names M1ForCausalLM gives its parameters where it creates them: a tree shaped like the
    parameters, each leaf a tuple with one name per dim ("layers" for the stacked group axis G).

    source: an M1Config, or a parameter tree of M1ForCausalLM (arrays or jax.ShapeDtypeStruct). The names depend
    only on the layer schedule's period, not on any size, so a tree is named by an abstract init of a tiny model
    with the tree's period. Raises ValueError for a tree M1ForCausalLM does not make.
    """
    is_names = lambda x: isinstance(x, tuple)
    if isinstance(source, M1Config):
        period, conv = source.layer_types[:source.layer_period], source.lightning_short_conv > 0
        return jax.tree.map(tuple, _names_for_schedule(period, conv), is_leaf=is_names)
    names = jax.tree.map(tuple, _names_for_schedule(*_schedule_of(source)), is_leaf=is_names)  # a fresh copy
    if jax.tree.structure(source) != jax.tree.structure(names, is_leaf=is_names):
        raise ValueError("param_logical_axes: the tree does not have M1ForCausalLM's parameter layout (embed, "
                         "groups/layer_j/..., final_norm, lm_head); pass its names explicitly (logical_axes=, "
                         "e.g. m1jax.layers.partitioning.logical_axes(module, *example_inputs))")
    return names


def _schedule_of(params: Any) -> tuple[tuple[str, ...], bool]:
    """(the period of layer kinds, whether its lightning layers have a short convolution) of an M1ForCausalLM
    parameter tree (a lightning layer has attn/qkv_proj, and attn/short_conv with lightning_short_conv > 0)."""
    groups = params.get("groups") if hasattr(params, "get") else None
    if not hasattr(groups, "keys") or not groups:
        raise ValueError("param_logical_axes: not an M1ForCausalLM parameter tree (no 'groups'); pass its names "
                         "explicitly (logical_axes=)")
    kinds, conv = [], False
    for j in range(len(groups)):
        attn = groups.get(f"layer_{j}", {}).get("attn", {})
        kinds.append("lightning" if "qkv_proj" in attn else "softmax")
        conv = conv or "short_conv" in attn
    return tuple(kinds), conv


@functools.lru_cache(maxsize=16)
def _names_for_schedule(period: tuple[str, ...], short_conv: bool = False) -> Any:
    tiny = M1Config(vocab_size=8, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, num_experts=2,
                    experts_per_token=1, expert_size=8, layer_types=period, lightning_short_conv=int(short_conv))
    return logical_axes(M1ForCausalLM(tiny), jnp.zeros((1, 2), jnp.int32))
