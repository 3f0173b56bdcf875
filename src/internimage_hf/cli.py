"""`internimage-hf` command line: convert and publish official checkpoints, build kernels, run the demo."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time

# This module is imported by `internimage-hf --help`: keep torch and transformers out of its top level (the package
# defers them while the command starts, see `internimage_hf.__init__`).

# What each optional extra of the package provides (import name -> extra).
EXTRA_OF_MODULE = {
    "accelerate": "train",
    "sklearn": "train",
    "matplotlib": "train",
    "datasets": "train",
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "kernels": "kernels",
    "ninja": "kernels",
}
# Modules a subcommand needs beyond the core dependencies (checked before anything heavy is imported).
COMMAND_NEEDS = {"demo": ("accelerate", "sklearn", "matplotlib")}
PIP_NAME = {"sklearn": "scikit-learn"}


class MissingExtra(RuntimeError):
    """An optional dependency of a subcommand is not installed; the message names the extra to install."""

    def __init__(self, modules, what: str = "this command"):
        modules = list(dict.fromkeys(modules))
        extras = sorted({EXTRA_OF_MODULE.get(m, "") for m in modules} - {""})
        names = ", ".join(PIP_NAME.get(m, m) for m in modules)
        install = " ".join(f"pip install 'internimage-hf[{e}]'" for e in extras) or f"pip install {names}"
        super().__init__(f"{what} needs {names}, which {'is' if len(modules) == 1 else 'are'} not installed: {install}")


def missing_modules(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _load_package() -> None:
    """Import and register the model classes (deferred while the command parsed its arguments)."""
    from . import _load

    _load()


def _fail(command: str, error: BaseException, debug: bool = False) -> int:
    """Report an error as one line on stderr (a traceback only with --debug)."""
    if debug:
        raise error
    if isinstance(error, ModuleNotFoundError) and error.name and error.name.split(".")[0] in EXTRA_OF_MODULE:
        error = MissingExtra([error.name.split(".")[0]], f"internimage-hf {command}")
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, OSError, MissingExtra)):  # ConversionError is a ValueError
        text = f"{type(error).__name__}: {text}"
    print(f"internimage-hf {command}: error: {text}", file=sys.stderr)
    return 1


def _convert(args: argparse.Namespace) -> int:
    from .conversion.pipeline import convert_checkpoint

    if args.trust_pickle and str(args.source).startswith("hf://"):
        return _fail(
            "convert",
            ValueError(
                "--trust-pickle applies only to a local file you name, never to a Hub source: download the file, check "
                "it, and convert the local copy"
            ),
            args.debug,
        )
    try:
        result = convert_checkpoint(
            args.source,
            args.output_dir,
            variant=args.variant,
            official_config=args.official_config,
            overwrite=args.overwrite,
            trust_pickle=args.trust_pickle,
            use_ema=args.use_ema,
            labels=args.labels,
            image_size=args.image_size,
            release=args.release,
            expected=args.expected,
            tolerance=args.tolerance,
            max_shard_size=args.max_shard_size,
            model_id=args.model_id or args.push_to_hub,
            base_model=args.base_model,
            revision=args.source_revision,
        )
    except Exception as error:  # every failure is one line; nothing partial was written
        return _fail("convert", error, args.debug)
    plan = result.plan
    found = plan.title + (f": {plan.architecture.short()}" if plan.architecture else "")
    release = f", release {plan.release.name}" if plan.release else ""
    print(
        f"Model: {found}, {plan.config.num_labels} classes ({plan.labels} labels), {plan.image_size}x"
        f"{plan.image_size} input{release}, {result.num_parameters:,} parameters"
    )
    verification = result.verification
    if verification.expected:
        print(
            f"Verified against {verification.expected}: relative errors {verification.errors_text()} "
            f"(tolerance {verification.tolerance:g})"
        )
    print(f"Converted {args.source} -> {result.output_dir}")
    if args.push_to_hub:
        from .conversion.hub import push_folder

        try:
            url = push_folder(
                result.output_dir,
                args.push_to_hub,
                private=args.private,
                revision=args.revision,
                create_pr=args.create_pr,
                commit_message=args.commit_message,
            )
        except Exception as error:
            return _fail("convert", error, args.debug)
        print(f"Pushed {result.output_dir} to {args.push_to_hub}: {url}")
    return 0


def _convert_all(args: argparse.Namespace) -> int:
    from .conversion.batch import convert_all, summary_table

    try:
        results = convert_all(
            args.manifest,
            source_dir=args.source_dir,
            output_root=args.output_root,
            push=args.push,
            only=args.only,
            org=args.org,
            overwrite=args.overwrite,
            skip_existing=args.skip_existing,
            trust_pickle=args.trust_pickle,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            max_shard_size=args.max_shard_size,
        )
    except Exception as error:
        return _fail("convert-all", error, args.debug)
    print(summary_table(results))
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        print(
            f"internimage-hf convert-all: error: {len(failed)} of {len(results)} failed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


class _BuildProgress:
    """Shows what `build_kernels` is doing: on a terminal one line that counts the seconds, otherwise a line per
    step and one every 15 s while the compiler runs. Records whether a build ran or an existing one was reused."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.reused = False
        self.started = time.perf_counter()
        self.last_step, self.last_line = None, 0.0
        self.open_line = False

    def __call__(self, step: str, seconds: float = 0.0) -> None:
        if step == "reuse":
            self.reused = True
            return
        if (
            step == "compile"
            and self.last_step is None
            and not (shutil.which("ninja") or importlib.util.find_spec("ninja"))
        ):
            raise MissingExtra(["ninja"], "compiling the DCNv3 kernel")
        text = {
            "compile": "compiling the DCNv3 kernel (about a minute)",
            "smoke-test": "testing the new build",
            "install": "installing the build",
        }.get(step, step)
        if self.tty:
            suffix = f" {seconds:.0f} s" if step == "compile" and seconds else ""
            print(f"\r\033[K{text}...{suffix}", end="", file=self.stream, flush=True)
            self.open_line = True
        elif step != self.last_step:
            print(f"{text}...", file=self.stream, flush=True)
            self.last_line = seconds
        elif seconds - self.last_line >= 15:
            print(f"  still compiling: {seconds:.0f} s", file=self.stream, flush=True)
            self.last_line = seconds
        self.last_step = step

    def close(self) -> None:
        if self.open_line:
            print(file=self.stream, flush=True)
            self.open_line = False


def _build_kernels(args: argparse.Namespace) -> int:
    from .ops.build import build_kernels

    progress = _BuildProgress()
    try:
        path = build_kernels(
            cache_dir=args.cache_dir, cuda=args.cuda, verbose=args.verbose, force=args.force, progress=progress
        )
    except Exception as error:  # a failed build is reported, never a traceback
        progress.close()
        print(f"internimage-hf build-kernels: error: {error}", file=sys.stderr)
        return 1
    progress.close()
    if progress.reused:
        print(f"Reused the up-to-date DCNv3 kernel build in {path} (same sources and torch; --force rebuilds it)")
    else:
        print(f"Built the DCNv3 kernel in {time.perf_counter() - progress.started:.0f} s: {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        return run_demo(args)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in EXTRA_OF_MODULE:
            return _fail("demo", error)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internimage-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert",
        help="convert an official .pth, OpenGVLab repo folder or Hub id into a "
        "save_pretrained folder with a model card (and push it)",
    )
    p.add_argument(
        "source",
        help="official .pth file, OpenGVLab remote-code repo folder, or a Hugging Face Hub "
        "source written hf://owner/name (a repo) or hf://owner/name/file.pth",
    )
    p.add_argument("output_dir", help="folder to create (written atomically)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--variant",
        help="official variant: t, s, b, l, xl, h, g; FlashInternImage flash_t, flash_s, flash_b, flash_l "
        "(default: detected from the weights; if both are known they must agree)",
    )
    which.add_argument(
        "--official-config", help="JSON file of official InternImage(...) / FlashInternImage(...) keyword arguments"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling of SOURCE when it is a local .pth file you trust (never applies to Hub sources)",
    )
    p.add_argument("--use-ema", action="store_true", help="take the 'model_ema' weights of a training checkpoint")
    p.add_argument(
        "--labels",
        default="auto",
        help="auto (ImageNet-1k/22k names for 1000/21841-class heads), "
        "none (LABEL_i), or a .json list / .txt file of class names",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="preprocessing resolution (default: the official release's evaluation resolution; 384 "
        "for other 21841-class heads; else the variant's)",
    )
    p.add_argument(
        "--release",
        default=None,
        help="official release this is (default: identified from the file "
        "name, variant and head), e.g. internimage-t-1k-224",
    )
    p.add_argument(
        "--expected",
        default=None,
        help="safetensors file with pixel_values, logits and optionally "
        "stage1..4: the converted model must reproduce them",
    )
    p.add_argument(
        "--tolerance", type=float, default=None, help="largest relative error accepted by --expected (default 1e-4)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="shard model.safetensors above this size (e.g. 2GB)")
    p.add_argument(
        "--model-id",
        default=None,
        help="repo id the model card's usage snippet loads (default: --push-to-hub, else OUTPUT_DIR)",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="base_model for the card of a fine-tune (default: the base release under the same owner)",
    )
    p.add_argument("--source-revision", default=None, help="revision of a Hub source")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this model repo")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.set_defaults(func=_convert)

    p = sub.add_parser("convert-all", help="convert (and push) every checkpoint of a manifest, with a summary table")
    p.add_argument("manifest", help="manifest JSON (see conversion/manifest.json)")
    p.add_argument(
        "--source-dir",
        default=None,
        help="folder holding the .pth files / remote-code repo folders "
        "(missing ones are downloaded from the manifest's "
        "source_repo, when it names one)",
    )
    p.add_argument("--output-root", default="converted", help="one output folder per entry goes here")
    p.add_argument("--push", action="store_true", help="upload each converted folder to its repo_id")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAMES",
        help="comma-separated entry names to convert (repeatable)",
    )
    p.add_argument("--org", default=None, help="owner replacing {org} in repo ids (default: the manifest's org)")
    done = p.add_mutually_exclusive_group()
    done.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    done.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep output folders from an earlier run (and push them with --push)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling of the local .pth files (never of downloaded ones)",
    )
    p.add_argument("--max-shard-size", default=None, help="shard size limit (default 5GB)")
    p.add_argument("--private", action="store_true", help="create the repos private")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--create-pr", action="store_true", help="open pull requests instead of committing")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.set_defaults(func=_convert_all)

    p = sub.add_parser("build-kernels", help="compile the DCNv3 CPU (and CUDA) kernel into the local cache")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="kernel cache folder (default: $INTERNIMAGE_HF_KERNEL_CACHE or ~/.cache/internimage_hf/kernels)",
    )
    cuda = p.add_mutually_exclusive_group()
    cuda.add_argument(
        "--cuda",
        action="store_true",
        default=None,
        help="require the CUDA kernel too (needs nvcc and a CUDA build of torch; default: build it "
        "when both are present)",
    )
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false", help="build the CPU kernel only")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_build_kernels)

    p = sub.add_parser("demo", help="offline end-to-end demo: fine-tune on scikit-learn digits, evaluate, classify")
    p.add_argument("--output-dir", default="outputs/demo", help="where the model and figures go")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="tiny budget (for tests)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1: the demo model is too small to gain from more)",
    )
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_modules(COMMAND_NEEDS.get(args.command, ()))
    if missing:
        return _fail(args.command, MissingExtra(missing, f"internimage-hf {args.command}"))
    if args.command != "build-kernels":  # the kernel build needs torch only
        _load_package()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
