"""diffusers' own best documented speed-up, applied to its Versatile Diffusion pipeline: the fair fast reference.

diffusers' "Accelerate inference" guide (optimization/fp16, section torch.compile, and "Fused projection
matrices") gives, for a UNet pipeline:
  1. the inductor flags conv_1x1_as_mm = True, coordinate_descent_tuning = True, epilogue_fusion = False,
     coordinate_descent_check_all_directions = True;
  2. the UNet and the VAE in channels-last memory;
  3. fused q|k|v (self-attention) and k|v (cross-attention) projections (`pipeline.fuse_qkv_projections()`);
  4. torch.compile(unet, mode="max-autotune", fullgraph=True), and vae.decode likewise.
The VD pipelines have no `fuse_qkv_projections()` of their own (they lack the mixin that defines it), so step 3
calls what that method calls: `fuse_qkv_projections()` of the image UNet (holding the text UNet's swapped-in
context layers in text_to_image) and of the VAE. A step that fails is recorded with its error and the rest is
applied; a fullgraph trace that fails at the first call is recorded and the module compiled again without it.
"""

import torch

INDUCTOR_FLAGS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                  "coordinate_descent_check_all_directions": True}


class CompiledReference:
    """The recipe on one loaded diffusers VD pipeline. `applied` lists the steps done, `failed` the steps that
    raised (step -> error)."""

    def __init__(self, pipe, mode: str | None = "max-autotune", backend: str = "inductor"):
        self.pipe, self.backend = pipe, backend
        # torch.compile takes `mode` for inductor only; another backend (eager: dynamo's trace, no codegen) is a
        # cheap check that the recipe traces VD's pipelines, for CPU smoke runs
        self.options = {"mode": mode} if backend == "inductor" else {}
        self.applied: list[str] = []
        self.failed: dict[str, str] = {}
        if backend == "inductor":
            import torch._inductor.config as inductor
            for flag, value in INDUCTOR_FLAGS.items():
                setattr(inductor, flag, value)
            self.applied.append("inductor flags " + ", ".join(f"{k}={v}" for k, v in INDUCTOR_FLAGS.items()))
        self._try("UNet and VAE channels-last", lambda: [m.to(memory_format=torch.channels_last)
                                                         for m in (pipe.image_unet, pipe.vae)])
        self._try("image_unet.fuse_qkv_projections()", lambda: pipe.image_unet.fuse_qkv_projections())
        self._try("vae.fuse_qkv_projections()", lambda: pipe.vae.fuse_qkv_projections())
        self.unet, self.decode = pipe.image_unet, pipe.vae.decode  # the originals, to compile again if need be
        self.compile(fullgraph=True)

    def _try(self, step: str, fn) -> None:
        try:
            fn()
            self.applied.append(step)
        except Exception as e:  # recorded, the rest of the recipe still applies
            self.failed[step] = f"{type(e).__name__}: {e}"

    def compile(self, fullgraph: bool) -> None:
        what = f"torch.compile(image_unet and vae.decode, backend={self.backend}, fullgraph={fullgraph}" + (
            f", mode={self.options['mode']})" if self.options else ")")
        self.pipe.image_unet = torch.compile(self.unet, fullgraph=fullgraph, backend=self.backend, **self.options)
        self.pipe.vae.decode = torch.compile(self.decode, fullgraph=fullgraph, backend=self.backend, **self.options)
        self.applied.append(what)

    def first_call(self, fn):
        """fn() (the first pipeline call, which compiles); if the full-graph trace fails, record why and compile
        again without fullgraph."""
        try:
            return fn()
        except torch._dynamo.exc.TorchDynamoException as e:
            self.failed["fullgraph=True"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            torch._dynamo.reset()
            self.compile(fullgraph=False)
            return fn()

    def summary(self) -> dict:
        return {"applied": self.applied, "failed": self.failed}
