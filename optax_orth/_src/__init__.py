"""Private implementation of optax_orth; import from the top-level package."""
