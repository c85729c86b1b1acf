"""sfbd_jax: JAX/Flax diffusion models trained from corrupted data (SFBD, Ambient-Omni, CEP)."""

__version__ = "0.1.0"
