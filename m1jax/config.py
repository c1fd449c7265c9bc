"""M1Config: every architectural fact of a MiniMax-M1-style hybrid, named presets, and both config.json flavours;
RunPolicy: how a run computes that model (dtypes, lm_head precision, expert threshold and capacity, kernel block,
remat), which is never part of the model.

The released checkpoint's config.json ("original" flavour: attn_type_list, layernorm_*_alpha/beta, rotary_dim,
postnorm) and transformers' MiniMaxConfig ("transformers" flavour: layer_types, *_alpha_factor,
rope_parameters.partial_rotary_factor) both load through `M1Config.from_hf`; `to_hf` writes the transformers flavour.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

LIGHTNING = "lightning"
SOFTMAX = "softmax"
LAYER_KINDS = (LIGHTNING, SOFTMAX)
DTYPES = ("float32", "bfloat16", "float16")
LIGHTNING_NORM_EPS = 1e-6  # the lightning layer's RMSNorm over H*D channels (released default), not rms_norm_eps

REMAT_CHOICES = ("none", "full", "dots")  # activation recomputation per layer group (m1jax.model.REMAT_POLICIES)
# M1Config fields that are not the architecture (what a checkpoint's parameters compute): training coefficients, kept
# in M1Config because config.json records them. Changing one never makes another model (`same_architecture`).
TRAINING_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "initializer_range")
_M1JAX_ONLY_FIELDS = ("router_z_loss_coef",)  # written under config.json's "m1jax" key (transformers has no such key)
REFERENCE_BLOCK_SIZE = 256  # the block config.json's "block_size" gives the reference kernels (transformers' default)
_HF_LAYER_NAMES = {LIGHTNING: "linear_attention", SOFTMAX: "full_attention"}
_OURS_FROM_HF_LAYER = {v: k for k, v in _HF_LAYER_NAMES.items()}


def m1_schedule(num_layers: int, period: int = 8) -> tuple[str, ...]:
    """M1's layer schedule: softmax attention where (i + 1) % period == 0, lightning attention elsewhere."""
    return tuple(SOFTMAX if (i + 1) % period == 0 else LIGHTNING for i in range(num_layers))


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNorm's residual scale (2N)^(1/4); 3.5565588... for M1's 80 layers."""
    return (2.0 * num_layers) ** 0.25


@dataclasses.dataclass(frozen=True)
class M1Config:
    """Architecture of a MiniMax-M1-style model: what a checkpoint's config.json describes. Shapes below: Hd hidden,
    H heads, K kv heads, D head dim, E experts. How a run computes it (dtypes, lm_head precision, expert threshold and
    capacity, kernel block, remat) is its `RunPolicy`, not part of the config; the training coefficients
    (TRAINING_FIELDS) are here because config.json records them, but they do not change the model.

    The residual of each sublayer is DeepNorm post-norm: y = RMSNorm(h); h' = alpha * y + beta * Sublayer(y).
    """

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    expert_size: int
    layer_types: tuple[str, ...]
    rope_theta: float = 10_000_000.0
    rotary_dim: int | None = None  # None: the whole head
    lightning_alpha: float = 1.0
    lightning_beta: float = 1.0
    softmax_alpha: float = 1.0
    softmax_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 10_240_000
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    initializer_range: float = 0.02
    # Width W of a causal depthwise convolution over each lightning layer's projected q/k/v before their SiLU
    # (m1jax.layers.short_conv); 0 = none, as in M1. A research option, not in any released checkpoint.
    lightning_short_conv: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        for name in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_experts",
                     "experts_per_token", "expert_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"M1Config.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "lightning_alpha", "lightning_beta", "softmax_alpha", "softmax_beta", "mlp_alpha",
                     "mlp_beta", "rms_norm_eps", "router_aux_loss_coef", "router_z_loss_coef", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise ValueError(f"M1Config.{name} must be a finite number, got {value!r}")
        if (isinstance(self.lightning_short_conv, bool) or not isinstance(self.lightning_short_conv, (int, np.integer))
                or self.lightning_short_conv < 0):
            raise ValueError(f"M1Config.lightning_short_conv must be a non-negative integer (the convolution's width; "
                             f"0 for none, as in M1), got {self.lightning_short_conv!r}")
        if not self.layer_types:
            raise ValueError("M1Config.layer_types is empty: give one 'lightning' or 'softmax' entry per layer")
        bad = sorted({t for t in self.layer_types if t not in LAYER_KINDS})
        if bad:
            raise ValueError(f"M1Config.layer_types has unknown kinds {bad}; use {LAYER_KINDS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"M1Config.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"M1Config.experts_per_token={self.experts_per_token} exceeds "
                             f"num_experts={self.num_experts}")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ValueError(f"M1Config.rotary_dim={self.rotary_dim} must be even and in (0, head_dim="
                             f"{self.head_dim}]")
        if self.rope_theta <= 0:
            raise ValueError(f"M1Config.rope_theta must be positive, got {self.rope_theta}")
        for name in ("rms_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"M1Config.{name} must be positive, got {getattr(self, name)}")

    # ----- derived facts (one place each) -----
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def layer_period(self) -> int:
        """Smallest p dividing num_layers with layer_types periodic in p: layers are scanned in groups of p."""
        n = self.num_layers
        for p in range(1, n + 1):
            if n % p == 0 and self.layer_types == self.layer_types[:p] * (n // p):
                return p
        return n

    @property
    def num_groups(self) -> int:
        return self.num_layers // self.layer_period

    def residual_scales(self, kind: str) -> tuple[float, float]:
        """(alpha, beta) of the attention sublayer of a layer of this kind."""
        return ((self.lightning_alpha, self.lightning_beta) if kind == LIGHTNING
                else (self.softmax_alpha, self.softmax_beta))

    def lightning_slopes(self) -> np.ndarray:
        """(L, H) float32 decay slopes: s_h = 2^(-8(h+1)/H), scaled per layer l by 1 - l/(L-1+1e-5) + 1e-5.

        Earlier layers decay faster. Rows of softmax layers are computed too (unused), so the table is indexed by the
        global layer index.
        """
        h = np.arange(self.num_heads, dtype=np.float64) + 1
        base = (1.0 / 2.0 ** (8.0 / self.num_heads)) ** h
        layer = np.arange(self.num_layers, dtype=np.float64)[:, None]
        factor = (1.0 - layer / (self.num_layers - 1 + 1e-5) + 1e-5).astype(np.float32)
        return base[None, :].astype(np.float32) * factor

    def replace(self, **changes) -> "M1Config":
        _not_policy(changes)
        return dataclasses.replace(self, **changes)

    # ----- presets -----
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "M1Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    # ----- config.json, both flavours -----
    @classmethod
    def from_hf(cls, path: str | os.PathLike | dict, **overrides) -> "M1Config":
        """Read a config.json (file, directory holding one, or an already parsed dict), either flavour. Its run-time
        entries (dtype, block_size) are not the architecture: `stored_dtype` reads the weights' dtype."""
        raw, source = _read_hf(path)
        try:
            config = _from_hf_dict(raw)
        except (ValueError, TypeError) as err:
            message = str(err) if str(err).startswith("config.json") else f"config.json: {err}"
            raise ValueError(message.replace("config.json", source, 1)) from None
        return config.replace(**overrides)

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """The transformers flavour (MiniMaxConfig), loadable by transformers' MiniMaxForCausalLM. dtype: the stored
        weights' dtype (config.json's "dtype"); block_size is the reference kernels' block, REFERENCE_BLOCK_SIZE."""
        if dtype not in DTYPES:
            raise ValueError(f"to_hf(dtype={dtype!r}): use one of {DTYPES}")
        if self.lightning_short_conv:
            raise ValueError(f"M1Config.lightning_short_conv={self.lightning_short_conv}: transformers' MiniMax has no "
                             "short convolution, so no config.json can describe this model; set it to 0 to export, or "
                             "keep such a research model in your own loop (as experiments/hybrid_ablation does)")
        return {
            "architectures": ["MiniMaxForCausalLM"],
            "model_type": "minimax",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.expert_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": False,
            "num_experts_per_tok": self.experts_per_token,
            "num_local_experts": self.num_experts,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta),
                                "partial_rotary_factor": self.rotary_dim / self.head_dim},
            "layer_types": [_HF_LAYER_NAMES[t] for t in self.layer_types],
            "block_size": REFERENCE_BLOCK_SIZE,
            "linear_attn_alpha_factor": self.lightning_alpha,
            "linear_attn_beta_factor": self.lightning_beta,
            "full_attn_alpha_factor": self.softmax_alpha,
            "full_attn_beta_factor": self.softmax_beta,
            "mlp_alpha_factor": self.mlp_alpha,
            "mlp_beta_factor": self.mlp_beta,
            "dtype": dtype,
            "sliding_window": None,
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            # m1jax's own training coefficients (transformers keeps unknown keys as plain attributes)
            "m1jax": {name: getattr(self, name) for name in _M1JAX_ONLY_FIELDS},
        }

    def save_hf(self, directory: str | os.PathLike, dtype: str = "float32") -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_hf(dtype), f, indent=2)
        return path


def architecture_differences(a: M1Config, b: M1Config) -> list[str]:
    """Names of the architecture fields (all but TRAINING_FIELDS) on which a and b differ."""
    return [f.name for f in dataclasses.fields(M1Config) if f.name not in TRAINING_FIELDS
            and getattr(a, f.name) != getattr(b, f.name)]


def same_architecture(a: M1Config, b: M1Config) -> bool:
    """Whether a and b describe the same model (same parameters, same function), whatever their training
    coefficients: the resume check. Run-time policy (`RunPolicy`) is not in a config, so it never differs here."""
    return not architecture_differences(a, b)


@dataclasses.dataclass(frozen=True)
class RunPolicy:
    """How a run computes an M1Config's model: never part of the model, so any of it may change between runs, on
    resume, or between a trainer and its sampler (`M1ForCausalLM(config, policy=RunPolicy(...))`).

    param_dtype: the parameters' dtype when initialised (loaded weights keep theirs); the router stays float32.
    compute_dtype: activations and matmuls; router softmax, lightning state, norms' statistics stay float32.
    float32_lm_head: the lm_head in float32 (the paper's fix for the training-inference probability mismatch):
      float32 operands and logits at JAX's default matmul precision, which on recent NVIDIA GPUs lets the dot run
      on TF32 tensor cores (research-1b's head ran at ~245 TFLOP/s on an H200, above the card's float32 rate:
      benchmarks/RESULTS.md, "The float32 head"): 8-9x closer to float64 token log-probabilities than the bf16 head;
      full float32 products (jax.default_matmul_precision("highest") around the step) are 75-140x closer and cost 6x
      the head's TF32 time (RESULTS.md, "The head's matmul precision against float64").
    expert_threshold: inference, skip a token's lower-ranked experts whose renormalised weight is below this (0: exact).
    capacity_factor: None is dropless; else each expert takes at most ceil(cf * N * k / E) calls of a batch.
    block_size: the lightning kernels' block (None: each kernel picks its own; the result does not depend on it).
    remat: activation recomputation per layer group in training: "none", "full" or "dots".
    """

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    float32_lm_head: bool = True
    expert_threshold: float = 0.0
    capacity_factor: float | None = None
    block_size: int | None = None
    remat: str = "none"

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"RunPolicy.{name}={getattr(self, name)!r}; use one of {DTYPES}")
        if not isinstance(self.float32_lm_head, bool):
            raise ValueError(f"RunPolicy.float32_lm_head={self.float32_lm_head!r}; pass True or False")
        if (isinstance(self.expert_threshold, bool) or not isinstance(self.expert_threshold, (int, float, np.number))
                or not 0.0 <= self.expert_threshold < 1.0):
            raise ValueError(f"RunPolicy.expert_threshold={self.expert_threshold!r}; pass a number in [0, 1) "
                             "(0 computes every routed expert)")
        if self.capacity_factor is not None and (
                isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float, np.number))
                or not (math.isfinite(self.capacity_factor) and self.capacity_factor > 0)):
            raise ValueError(f"RunPolicy.capacity_factor={self.capacity_factor!r}; pass a positive number, or None "
                             "(dropless)")
        if self.block_size is not None and (isinstance(self.block_size, bool) or
                                            not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1):
            raise ValueError(f"RunPolicy.block_size={self.block_size!r}; pass a positive integer, or None (the "
                             "kernel's own block)")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"RunPolicy.remat={self.remat!r}; choose one of {REMAT_CHOICES}")

    def replace(self, **changes) -> "RunPolicy":
        return dataclasses.replace(self, **changes)


def _not_policy(changes: dict) -> None:
    """A run-time choice given as an M1Config field: say where it goes instead of a bare TypeError."""
    policy = sorted(set(changes) & {f.name for f in dataclasses.fields(RunPolicy)})
    if policy:
        raise ValueError(f"{policy} are run-time policy, not the architecture (M1Config): pass "
                         f"RunPolicy({policy[0]}=...) to M1ForCausalLM(config, policy=...) instead")


def stored_dtype(path: str | os.PathLike | dict) -> str:
    """The weights' dtype a config.json records ("dtype", or the older "torch_dtype"); float32 when it names none
    of DTYPES."""
    raw, _ = _read_hf(path)
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def _read_hf(path: str | os.PathLike | dict) -> tuple[dict, str]:
    """(the parsed config.json, where it came from) of a file, a directory holding one, or a parsed dict."""
    source = "config.json"
    if isinstance(path, dict):
        raw = dict(path)
    else:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        source = path
        try:
            with open(path) as f:
                raw = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(raw).__name__}")
    return raw, source


def _require(raw: dict, key: str, flavour: str, why: str = ""):
    if key not in raw or raw[key] is None:
        raise ValueError(f"config.json ({flavour} flavour) lacks '{key}'{why}")
    return raw[key]


def _number(raw: dict, key: str, kind: type, default=None, *, flavour: str, why: str = ""):
    """raw[key] as int or float (a required field when default is None), naming the field when it is not one."""
    value = raw.get(key, default) if default is not None else _require(raw, key, flavour, why)
    if value is None:
        value = default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise ValueError(f"config.json field '{key}' must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
    return kind(value)


_ROPE_WHY = (": M1 rotates only part of each head with a specific base, and a default would silently change the "
             "model; the released checkpoint has rotary_dim 64 and rope_theta 10000000")
_KV_WHY = ": the number of key/value heads defines the attention weights (transformers' default is 8)"


def _from_hf_dict(raw: dict) -> M1Config:
    if "attn_type_list" in raw:
        flavour = "original"
        if not isinstance(raw["attn_type_list"], list) or not all(t in (0, 1) for t in raw["attn_type_list"]):
            raise ValueError(f"config.json attn_type_list must be a list of 0 (lightning) and 1 (softmax), got "
                             f"{raw['attn_type_list']!r}")
        layer_types = tuple(SOFTMAX if int(t) == 1 else LIGHTNING for t in raw["attn_type_list"])
        scales = {f"{ours}_{ab}": _number(raw, f"layernorm_{theirs}_{ab}", float, 1.0, flavour=flavour)
                  for ours, theirs in (("lightning", "linear_attention"), ("softmax", "full_attention"),
                                       ("mlp", "mlp"))
                  for ab in ("alpha", "beta")}
        if not raw.get("postnorm", False):
            raise ValueError("config.json has postnorm=false (pre-norm residuals): only M1's DeepNorm post-norm "
                             "is implemented")
        if raw.get("shared_intermediate_size", 0):
            raise ValueError("config.json has a shared expert (shared_intermediate_size > 0): M1 has none and it "
                             "is not implemented")
        head_dim = _head_dim(raw, flavour)
        rotary_dim = _number(raw, "rotary_dim", int, flavour=flavour, why=_ROPE_WHY)
        rope_theta = _number(raw, "rope_theta", float, flavour=flavour, why=_ROPE_WHY)
    elif "layer_types" in raw:
        flavour = "transformers"
        if not isinstance(raw["layer_types"], list) or not all(isinstance(t, str) for t in raw["layer_types"]):
            raise ValueError(f"config.json layer_types must be a list of names, got {raw['layer_types']!r}")
        unknown = sorted(set(raw["layer_types"]) - set(_OURS_FROM_HF_LAYER))
        if unknown:
            raise ValueError(f"config.json layer_types has unknown kinds {unknown}; expected "
                             f"{sorted(_OURS_FROM_HF_LAYER)}")
        layer_types = tuple(_OURS_FROM_HF_LAYER[t] for t in raw["layer_types"])
        scales = {f"{ours}_{ab}": _number(raw, f"{theirs}_{ab}_factor", float, 1.0, flavour=flavour)
                  for ours, theirs in (("lightning", "linear_attn"), ("softmax", "full_attn"), ("mlp", "mlp"))
                  for ab in ("alpha", "beta")}
        head_dim = _head_dim(raw, flavour)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.json rope_parameters must be an object, got {rope!r}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json rope_parameters.rope_type={rope.get('rope_type')!r}: only the default "
                             "(unscaled) RoPE of M1 is implemented")
        merged = {**{k: raw[k] for k in ("rope_theta", "partial_rotary_factor") if k in raw}, **rope}
        factor = _number(merged, "partial_rotary_factor", float, flavour=flavour,
                         why=" (in rope_parameters)" + _ROPE_WHY)
        rope_theta = _number(merged, "rope_theta", float, flavour=flavour, why=" (in rope_parameters)" + _ROPE_WHY)
        rotary_dim = int(round(head_dim * factor))
    else:
        raise ValueError("config.json has neither 'attn_type_list' (original MiniMax flavour) nor 'layer_types' "
                         "(transformers flavour): not a MiniMax config")
    num_layers = _number(raw, "num_hidden_layers", int, flavour=flavour)
    if len(layer_types) != num_layers:
        raise ValueError(f"config.json: {len(layer_types)} layer types for num_hidden_layers={num_layers}")
    if raw.get("tie_word_embeddings", False):
        raise ValueError("config.json ties embeddings and lm_head: M1 does not, and it is not implemented")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={raw['hidden_act']!r}: M1's experts use silu")
    if raw.get("sliding_window") is not None:
        raise ValueError("config.json sets sliding_window: M1's softmax layers attend to the whole context")
    extra = raw.get("m1jax", {})
    if not isinstance(extra, dict):
        raise ValueError(f"config.json field 'm1jax' must be an object, got {extra!r}")
    integer = lambda key, default=None, why="": _number(raw, key, int, default, flavour=flavour, why=why)
    real = lambda key, default: _number(raw, key, float, default, flavour=flavour)
    return M1Config(
        vocab_size=integer("vocab_size"),
        hidden_size=integer("hidden_size"),
        num_heads=integer("num_attention_heads"),
        num_kv_heads=integer("num_key_value_heads", why=_KV_WHY),
        head_dim=head_dim,
        num_experts=integer("num_local_experts"),
        experts_per_token=integer("num_experts_per_tok"),
        expert_size=integer("intermediate_size"),
        layer_types=layer_types,
        rope_theta=rope_theta,
        rotary_dim=rotary_dim,
        rms_norm_eps=real("rms_norm_eps", 1e-5),
        max_position_embeddings=integer("max_position_embeddings", 10_240_000),
        router_aux_loss_coef=real("router_aux_loss_coef", 0.001),
        initializer_range=real("initializer_range", 0.02),
        **scales,
        **{k: v for k, v in extra.items() if k in _M1JAX_ONLY_FIELDS},  # older files' run-time keys are ignored
    )


def _head_dim(raw: dict, flavour: str) -> int:
    if raw.get("head_dim"):
        return _number(raw, "head_dim", int, flavour=flavour)
    hidden = _number(raw, "hidden_size", int, flavour=flavour)
    heads = _number(raw, "num_attention_heads", int, flavour=flavour)
    if heads <= 0 or hidden % heads:
        raise ValueError(f"config.json has no head_dim and hidden_size={hidden} is not a multiple of "
                         f"num_attention_heads={heads}; give head_dim")
    return hidden // heads


def _m1_full(**overrides) -> M1Config:
    alpha = deepnorm_alpha(80)
    base = M1Config(
        vocab_size=200_064, hidden_size=6144, num_heads=64, num_kv_heads=8, head_dim=128,
        num_experts=32, experts_per_token=2, expert_size=9216, layer_types=m1_schedule(80),
        rope_theta=10_000_000.0, rotary_dim=64,
        lightning_alpha=alpha, softmax_alpha=alpha, mlp_alpha=alpha,
        max_position_embeddings=10_240_000,
    )
    return dataclasses.replace(base, **overrides)


def _research(num_layers: int, **fields) -> M1Config:
    alpha = deepnorm_alpha(num_layers)
    return M1Config(layer_types=m1_schedule(num_layers), lightning_alpha=alpha, softmax_alpha=alpha,
                    mlp_alpha=alpha, **fields)


PRESETS: dict[str, M1Config] = {
    # The released models: one architecture, three sets of weights.
    "minimax-m1-80k": _m1_full(),
    "minimax-m1-40k": _m1_full(),
    "minimax-text-01": _m1_full(),
    # Research sizes (M1's 7:1 schedule and top-2 routing, scaled down).
    "tiny": M1Config(
        vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4,
        experts_per_token=2, expert_size=96, layer_types=m1_schedule(4, period=2), rope_theta=10_000.0,
        rotary_dim=8, max_position_embeddings=65_536,
        lightning_alpha=deepnorm_alpha(4), softmax_alpha=deepnorm_alpha(4), mlp_alpha=deepnorm_alpha(4)),
    "small": _research(
        8, vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=32,
        experts_per_token=2, expert_size=512, rope_theta=10_000.0, rotary_dim=32,
        max_position_embeddings=1_048_576),
    "research-1b": _research(
        8, vocab_size=32_000, hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128, num_experts=32,
        experts_per_token=2, expert_size=512, rope_theta=10_000_000.0, rotary_dim=64,
        max_position_embeddings=10_240_000),
    # The inference benchmark's shape (issue: prefill/decode against transformers on one GPU).
    "hf-bench": _research(
        8, vocab_size=32_000, hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64, num_experts=8,
        experts_per_token=2, expert_size=1536, rope_theta=10_000_000.0, rotary_dim=32,
        max_position_embeddings=1_048_576),
}
