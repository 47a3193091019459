"""Sampling: `schedulers` (noise schedule and samplers), `generation` (the compiled,
pmapped guided loop), `concepts` (learned concepts: gathered, checked, tokenized into a
tokenizer of their own), `runner` (prompts and PNGs for `ti_jax.sample`), and `blended` /
`editing` (Blended Latent Diffusion region edits for `ti_jax.edit`).
"""
