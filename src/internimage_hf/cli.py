"""`internimage-hf` command line: convert official checkpoints, build kernels, run the demo."""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert

    try:
        out = convert(args.source, args.output_dir, variant=args.variant, official_config=args.official_config,
                      overwrite=args.overwrite, trust_pickle=args.trust_pickle, use_ema=args.use_ema)
    except (ConversionError, ValueError) as error:
        print(f"internimage-hf convert: error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {args.source} -> {out}")
    return 0


def _build_kernels(args: argparse.Namespace) -> int:
    from .ops.build import build_kernels

    try:
        path = build_kernels(cache_dir=args.cache_dir, cuda=args.cuda, verbose=args.verbose)
    except Exception as error:  # a failed build is reported, never a traceback
        print(f"internimage-hf build-kernels: error: {error}", file=sys.stderr)
        return 1
    print(f"Built DCNv3 kernel into {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internimage-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an official .pth or OpenGVLab repo folder to a save_pretrained folder")
    p.add_argument("source", help="official .pth file or OpenGVLab remote-code repo folder")
    p.add_argument("output_dir", help="folder to create (written atomically)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--variant", help="official variant: t, s, b, l, xl, h, g")
    which.add_argument("--official-config", help="JSON file of official InternImage(...) keyword arguments")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of the .pth (only for files you trust)")
    p.add_argument("--use-ema", action="store_true", help="take the 'model_ema' weights of a training checkpoint")
    p.set_defaults(func=_convert)

    p = sub.add_parser("build-kernels", help="compile the DCNv3 CPU (and CUDA) kernel into the local cache")
    p.add_argument("--cache-dir", default=None, help="kernel cache folder (default: $INTERNIMAGE_HF_KERNEL_CACHE "
                                                     "or ~/.cache/internimage_hf/kernels)")
    p.add_argument("--cuda", action="store_true", default=None, help="also build the CUDA kernel (needs nvcc)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_build_kernels)

    p = sub.add_parser("demo", help="offline end-to-end demo: fine-tune on scikit-learn digits, evaluate, classify")
    p.add_argument("--output-dir", default="outputs/demo", help="where the model and figures go")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="tiny budget (for tests)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
