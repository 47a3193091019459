"""Frozen Flax modules of the latent diffusion models (UNet, VAE, CLIP text, LDMBert, CLIP),
proven equal to diffusers/transformers PyTorch by tests/models. `layers` holds the UNet/VAE
blocks and attention, `transformer` the encoder block the three text/vision towers share.
"""
