"""Latent spaces: the diffusers AutoencoderKL ported to NNX, a small trainable VAE, space-to-depth."""
