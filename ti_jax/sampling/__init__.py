"""Sampling: `schedulers` (noise schedule and samplers), `generation` (the compiled,
pmapped guided loop) and `runner` (concepts, prompts and PNGs for `ti_jax.sample`).
"""
