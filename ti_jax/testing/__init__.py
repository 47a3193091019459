"""Offline stand-ins for tests and demos: `tiny_models` (random-weight diffusers folders),
`tiny_tokenizer` (CLIP/BERT vocabularies) and `example_images` (the shipped examples).
"""
