"""Inference: the cache, chunked prefill, the decode loop, sampling, generate(), inference-state checkpoints."""
from m1jax.inference.cache import Cache, abstract_cache, cache_bytes, init_cache
from m1jax.inference.engine import InferenceState, Request, Timings, decode, prefill, start
from m1jax.inference.generate import (GenerateOutput, RoutingSummary, Usage, check_params, check_prompts,
                                      continue_generation, generate, make_request)
from m1jax.inference.sampling import SamplingParams, sample_tokens, top_k_filter, top_p_filter
from m1jax.inference.state_io import load_inference_state, save_inference_state

__all__ = ["Cache", "abstract_cache", "cache_bytes", "init_cache", "InferenceState", "Request", "Timings", "decode",
           "prefill", "start", "GenerateOutput", "RoutingSummary", "Usage", "check_params", "check_prompts",
           "continue_generation", "generate", "make_request", "SamplingParams", "sample_tokens", "top_k_filter",
           "top_p_filter", "load_inference_state", "save_inference_state"]
