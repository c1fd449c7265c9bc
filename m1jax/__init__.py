"""m1jax: MiniMax-M1 (lightning attention + softmax hybrid MoE) in JAX/Flax."""
from m1jax.config import PRESETS, M1Config, RunPolicy
from m1jax.model import M1ForCausalLM, M1Output, abstract_params, init_params
from m1jax.params import count_params

__all__ = ["M1Config", "PRESETS", "RunPolicy", "M1ForCausalLM", "M1Output", "init_params", "abstract_params",
           "count_params", "load_pretrained", "save_pretrained", "generate", "MiniMaxM1Tokenizer", "MiniMaxM1ForCausalLM"]


def __getattr__(name):  # checkpoint I/O and generation are imported on first use
    if name in ("load_pretrained", "save_pretrained"):
        from m1jax.checkpoint import hf
        return getattr(hf, name)
    if name == "generate":
        from m1jax.inference import generate
        return generate
    if name in ("MiniMaxM1Tokenizer", "MiniMaxM1ForCausalLM"):  # the transformers-shaped face (m1jax/auto.py)
        from m1jax import auto
        return getattr(auto, name)
    raise AttributeError(name)
