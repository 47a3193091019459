"""Sampling: `noise_schedule` (the training noise schedule and the scheduler-config
reading it shares with the samplers), `schedulers` (samplers), `generation` (the compiled,
pmapped guided loop), `concepts` (learned concepts: gathered, checked, tokenized into a
tokenizer of their own), `runner` (prompts and PNGs for `ti_jax.sample`), and `blended` /
`editing` (Blended Latent Diffusion region edits for `ti_jax.edit`).
"""
