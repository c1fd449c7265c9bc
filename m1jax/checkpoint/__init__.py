"""Checkpoints: Hugging Face safetensors (`hf`) and orbax training state (`state`).

`CheckpointError` (a ValueError) is raised for a checkpoint that cannot be read; its message names the step or file.
"""

__all__ = ["CheckpointError"]


def __getattr__(name):  # lazy: importing m1jax.checkpoint.names must not import orbax
    if name == "CheckpointError":
        from m1jax.checkpoint.state import CheckpointError
        return CheckpointError
    raise AttributeError(f"module 'm1jax.checkpoint' has no attribute {name!r}")
