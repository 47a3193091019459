"""A small procedural world where textual inversion can be measured offline.

`scenes`: captioned renders with ground-truth labels; `tokenizer`: its
CLIP-format vocabulary; `checker`: an attribute classifier standing in for
CLIP; `base_model`: the tiny Stable Diffusion trained on the world.
"""
