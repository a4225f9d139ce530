"""Compile every kernel of vd.kernels for an H100 (sm_90) on a machine without a GPU, as the launcher would
specialise it for VD's shapes (16-byte aligned pointers, sizes and strides divisible by 16, unit strides as
constants): the interpreter runs the kernels' Python, this checks what only the real compiler checks (types of
loop-carried values, constexpr use, layouts). Prints one line per kernel: its name and the vector widths of its
global loads and stores (v4: 4 x 32 bits, 8 fp16 values in one access). Run with TRITON_INTERPRET unset."""

import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vd.kernels import geglu, group_norm, layer_norm  # noqa: E402
from vd.kernels.common import LAUNCH_OPTIONS, next_pow2  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(name: str, fn, ints: list[str], pointers: dict[str, str], consts: dict) -> None:
    args = fn.arg_names
    signature = {a: pointers.get(a) or ("constexpr" if a in consts else "fp32" if a == "eps" else "i32") for a in args}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args) if a in pointers or a in ints}
    src = ASTSource(fn, signature, {(args.index(k),): v for k, v in consts.items()}, attrs)
    kernel = triton.compile(src, target=H100, options={"num_warps": 4, **LAUNCH_OPTIONS})
    ptx = kernel.asm["ptx"]
    loads = {m or "scalar" for m in re.findall(r"ld\.global\S*?(?:\.(v\d))?\.[bfsu]\d+", ptx)}
    stores = {m or "scalar" for m in re.findall(r"st\.global\S*?(?:\.(v\d))?\.[bfsu]\d+", ptx)}
    print(f"{name}: global loads {' '.join(sorted(loads))} stores {' '.join(sorted(stores))}")


def main() -> None:
    h = "*fp16"
    # as group_norm plans them for SD's 320 channels at 64x64 and 1280 at 16x16, the VAE's 128 at 512x512
    for layout, unit in (("nhwc", "c"), ("nchw", "p")):
        for cg, hw in ((10, 64 * 64), (40, 16 * 16), (4, 512 * 512)):
            gb = group_norm.groups_per_program(32, cg, 1 if layout == "nhwc" else hw, 2)
            block_p, block_c, tiles, _ = group_norm.plan(hw, cg, gb)
            common = dict(GROUPS=32, CG=cg, GB=gb, HAS_SHIFT=True, BLOCK_P=block_p, BLOCK_C=block_c,
                          BLOCK_G=next_pow2(gb), TILES=tiles)
            strides = ["hw", "sxn", "sxc", "sxp", "syn", "syc", "syp", "ssn"]
            compile_for_h100(f"chunk_moments {layout} C/G={cg}", group_norm._chunk_moments, strides,
                             dict(x=h, shift=h, part="*fp32"), {**common, f"sx{unit}": 1})
            compile_for_h100(f"normalize {layout} C/G={cg}", group_norm._normalize, strides,
                             dict(x=h, shift=h, weight=h, bias=h, y=h, part="*fp32"),
                             {**common, "SILU": True, "BLOCK_K": 32, f"sx{unit}": 1, f"sy{unit}": 1})
    compile_for_h100("geglu", geglu._geglu, ["inner", "sh", "sy"], dict(h=h, y=h), dict(BLOCK_M=4, BLOCK_I=1024))
    compile_for_h100("add_layer_norm", layer_norm._add_layer_norm, ["sx", "sr", "ss", "sy"],
                     dict(x=h, r=h, weight=h, bias=h, s=h, y=h), dict(D=320, BLOCK_M=8, BLOCK_D=512))


if __name__ == "__main__":
    main()
