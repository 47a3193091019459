"""ti_jax: Textual Inversion (Gal et al. 2022) in JAX/Flax.

Entry points: `python -m ti_jax.train | sample | edit | export | evaluate | tiny_model`; each is
flags, one library call and error printing. The library lives in the subpackages (see
ARCHITECTURE.md).
"""
