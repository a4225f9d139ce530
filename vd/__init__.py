"""Versatile Diffusion in plain PyTorch."""
