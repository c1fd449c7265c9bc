"""m1jax.eval (being built)."""
