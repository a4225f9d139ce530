"""python -m weights_convert SRC OUT [--dtype fp16|fp32|bf16] [--tasks ...] [--kl-f8 PATH] [--clip DIR]
                              [--optimus PATH] [--optimus-tokenizer DIR]"""

import argparse
import signal
import sys

from weights_convert.checkpoint import TASKS
from weights_convert.convert import DTYPES, convert
from weights_convert.tensorfile import CheckpointError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m weights_convert",
                                description="Convert a Versatile Diffusion checkpoint into vd's per-part folder.")
    p.add_argument("src", help="hub repo id, diffusers-layout folder, vd-four-flow-v1-0*.pth, or a converted folder")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="write only the parts these tasks need")
    p.add_argument("--kl-f8", help="kl-f8.pth for the current original layout (default: beside the .pth)")
    p.add_argument("--clip", help="diffusers-layout folder with the CLIP towers and tokenizer an original .pth lacks")
    p.add_argument("--optimus", help="optimus-vae.pth, the text VAE (default: beside the .pth or in pretrained_pth/)")
    p.add_argument("--optimus-tokenizer", help="folder with BERT's vocab.txt and GPT-2's vocab.json + merges.txt, "
                   "copied into the output")
    args = p.parse_args(argv)
    # a terminated run unwinds through convert(), which removes its temporary folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        out = convert(args.src, args.out, dtype=args.dtype, tasks=args.tasks, kl_f8=args.kl_f8, clip=args.clip,
                      optimus=args.optimus, optimus_tokenizer=args.optimus_tokenizer)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
