"""Base-model weights: `loading` (hub ids, folders, tokenizers -> `StableDiffusion`),
`single_file` (original-layout checkpoint files), `pipeline` (what both loaders share: the
component roles, `StableDiffusion`, `ModelLoadError`, the Flax modules built from configs),
`convert` (PyTorch state dicts <-> Flax trees), `safetensors_io` (bf16-aware, memory-mapped
reads), `presets` (architecture shapes) and the offline tiny models: `tiny_models`
(random-weight diffusers folders) and `tiny_tokenizer` (CLIP/BERT vocabularies).
"""
