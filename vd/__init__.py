"""Versatile Diffusion in plain PyTorch: text-to-image, image variation and dual-guided generation."""

__all__ = ["VersatileDiffusion", "GenerationOutput"]


def __getattr__(name: str):
    # imported on first use, so `import vd.nn` stays light and weights_convert can import vd.nn freely
    if name in __all__:
        from vd import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'vd' has no attribute {name!r}")
