"""Base-model weights: `loading` (hub ids, folders, tokenizers -> `StableDiffusion`),
`convert` (PyTorch state dicts <-> Flax trees), `safetensors_io` (bf16-aware, memory-mapped
reads) and `presets` (tiny-model shapes).
"""
