"""Versatile Diffusion in plain PyTorch: text-to-image, image variation, dual-guided generation, blending,
image-to-text and text variation."""

__version__ = "0.1.0"  # pyproject.toml reads it from here
__all__ = ["VersatileDiffusion", "GenerationOutput", "TextOutput"]


def __getattr__(name: str):
    # imported on first use, so `import vd.nn` stays light and weights_convert can import vd.nn freely
    if name in __all__:
        from vd import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'vd' has no attribute {name!r}")
