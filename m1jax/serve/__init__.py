"""m1jax.serve (being built)."""
