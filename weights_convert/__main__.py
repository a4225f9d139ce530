"""python -m weights_convert SRC OUT [--dtype fp16|fp32|bf16] [--tasks ...] [--kl-f8 PATH] [--clip DIR]
                              [--optimus PATH] [--optimus-tokenizer DIR]

Exit status: 0 done, 2 a mistake (one line on stderr naming the path: a bad source, an output that exists or
cannot be written), 130 interrupted by Ctrl-C, 143 by SIGTERM; an interrupted run leaves nothing behind."""

import argparse
import signal
import sys

from vd.checks import DTYPES
from vd.tasks import TASKS, parts_for
from weights_convert.convert import convert
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
        out = convert(args.src, args.out, dtype=args.dtype, parts=parts_for(args.tasks) if args.tasks else None,
                      kl_f8=args.kl_f8, clip=args.clip, optimus=args.optimus,
                      optimus_tokenizer=args.optimus_tokenizer)
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 128 + signal.SIGINT
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # OutputError names the output; others (a source folder's symlink loop, say) their path
        print(f"error: {e if e.filename is None else f'{e.filename}: {e.strerror or e}'}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
