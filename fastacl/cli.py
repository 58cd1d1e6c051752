"""The `fastacl` command (also `python -m fastacl`)."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

import fastacl
from fastacl.config import option_fields
from fastacl.errors import ConfigError, FastaclError, MissingFileError
from fastacl.export import ENCODER_CARD, ENCODER_WEIGHTS
from fastacl.models import BRANCHES
from fastacl.ops import extension_status, requested_backend
from fastacl.ops._dispatch import triton_available, triton_interpreter
from fastacl.utils import atomic_write_text


def _info(args: argparse.Namespace) -> int:

    info = {
        "fastacl": fastacl.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton_available": triton_available(),
        "triton_interpreter": triton_interpreter(),
        "backend": requested_backend(),
        "extension": extension_status(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _number(text: str) -> float:
    """A float option as a number or a fraction: 0.0314 or 8/255."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, "
                                         f"got {text!r}") from None


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig option, with the help text and default written in the config."""
    for name, (config_field, kind) in option_fields().items():
        flag = "--" + name.replace("_", "-")
        text, default = config_field.metadata["help"], config_field.default
        if kind is bool:
            if default is not None:  # None: the help text says where the default comes from
                text += f" (default {'on' if default else 'off'})"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
            continue
        if default is not None:
            text += f" (default {default})"
        parser.add_argument(flag, type=_number if kind is float else kind, default=None,
                            help=text)


def _train(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in option_fields()
               if getattr(args, name) is not None}
    if args.dry_run:  # the resolved config, validated; nothing is read or written
        if args.resume:
            raise ConfigError("--dry-run shows a new run's config; it does not take --resume")
        print(json.dumps(fastacl.TrainConfig.from_options(**options).resolve().to_dict(),
                         indent=2))
        return 0
    result = fastacl.train(resume=args.resume, **options)
    summary = result.summary
    if summary.get("interrupted"):
        return 130
    if "standard_accuracy" in summary:
        print("\n| method | dataset | epochs | standard acc. | robust acc. | attack | images/s |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {summary['method']} | {summary['dataset']} | {summary['epochs']} | "
              f"{100 * summary['standard_accuracy']:.2f}% | "
              f"{100 * summary['robust_accuracy']:.2f}% "
              f"| {summary['attack']} | {summary['images_per_second']:.1f} |")
    return 0


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _evaluate(args: argparse.Namespace) -> int:
    corruptions = {"auto": "auto", "on": True, "off": False}[args.corruptions]
    result = fastacl.evaluate(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, modes=args.modes,
        attacks=args.attacks, max_test=args.max_test, seed=args.seed, preset=args.preset,
        eps=args.eps, method=args.method, epochs=args.epochs, max_train=args.max_train,
        post_process=args.post_process, corruptions=corruptions,
        autoattack_version=args.autoattack_version,
        autoattack_attacks=args.autoattack_attacks, batch_size=args.batch_size,
        device=args.device, save=args.save,
    )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2))
    attacks = result["attacks"]
    columns = ["standard acc."] + [{"pgd20": "PGD-20", "autoattack": "AutoAttack"}[a]
                                   for a in attacks]
    with_corruptions = any("corruptions" in r for r in result["modes"].values())
    if with_corruptions:
        columns.append("corruptions (mean)")
    method = result["method"] or "published"  # the authors' checkpoints record no method
    print(f"\n{method} checkpoint {result['checkpoint']} -> {result['dataset']}: "
          f"{result['test_images']} test images, l_inf eps {result['eps']:.4g} "
          f"({result['eps_source']}), preset {result['preset']}")
    print("| mode | " + " | ".join(columns) + " | fine-tuning | seconds |")
    print("|---" * (len(columns) + 3) + "|")
    for mode, r in result["modes"].items():
        s = r["settings"]
        cells = [_percent(r["standard_accuracy"])]
        cells += [_percent(r.get(f"{a}_accuracy")) for a in attacks]
        if with_corruptions:
            cells.append(_percent(r.get("corruptions", {}).get("mean")))
        tuning = (f"{s['epochs']} ep, lr {s['lr']:g}, batch {s['batch_size']}, "
                  f"{s['train_images']} img")
        print(f"| {mode.upper()} | " + " | ".join(cells) + f" | {tuning} | {r['seconds']:.0f} |")
    if "autoattack" in attacks:
        aa = result["autoattack"]
        print(f"AutoAttack: {aa['version']}" + (f" ({', '.join(aa['attacks'])})"
                                               if aa["attacks"] else "")
              + f", l_inf eps {result['eps']:.4g}, fixed seed per mode")
    print(f"total {result['seconds']:.0f} s" + (f"; JSON written to {args.json}" if args.json
                                                  else ""))
    if args.save:
        print(f"classifiers saved in {args.save} (" + ", ".join(
            Path(r["saved"]).name for r in result["modes"].values())
            + "); load one with fastacl.load_classifier(path)")
    return 0


def _export(args: argparse.Namespace) -> int:
    out = fastacl.export_encoder(args.checkpoint, args.out_dir, branch=args.branch)
    card = json.loads((out / ENCODER_CARD).read_text())
    print(f"{card['method'] or 'unknown method'} encoder ({card['backbone']['name']}, "
          f"{args.branch} branch, {card['feature_dim']}-d features) written to "
          f"{out / ENCODER_WEIGHTS} with its card {out / ENCODER_CARD}; load it with "
          f"fastacl.load_encoder({str(out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastacl",
        description="Fast adversarial contrastive learning: ACL, DynACL, AIR and RCS.",
        epilog="--debug (anywhere): show the traceback of an error reported in one sentence.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser(
        "info", help="versions, device, backend and how the C++ extension was loaded"
    )
    info.set_defaults(func=_info)

    train = commands.add_parser(
        "train", help="pre-train an encoder (no arguments: the demo on the embedded MNIST sample)"
    )
    _add_train_options(train)
    train.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the run in DIR from its last checkpoint")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved, validated config and exit")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "evaluate", help="fine-tune and test a pre-trained encoder: SLF / ALF / AFF, PGD-20, "
        "AutoAttack (docs/acl-air.md section 8)"
    )
    evaluate.add_argument("--checkpoint", required=True, metavar="PATH",
                          help="a fastacl checkpoint (fastacl train's checkpoint.pt) or a "
                          "published ACL / DynACL / AIR checkpoint")
    evaluate.add_argument("--dataset", default=None,
                          help="downstream dataset (default: the checkpoint's)")
    evaluate.add_argument("--data-dir", default=None, help="folder holding the dataset files "
                          "(and CIFAR-10-C / CIFAR-100-C, if any)")
    evaluate.add_argument("--modes", default="slf,alf,aff", help="comma-separated: slf,alf,aff")
    evaluate.add_argument("--attacks", default="pgd20,autoattack",
                          help="comma-separated: pgd20,autoattack")
    evaluate.add_argument("--max-test", type=int, default=None,
                          help="test on a fixed random subset of N test images")
    evaluate.add_argument("--max-train", type=int, default=None,
                          help="fine-tune on a fixed random subset of N training images")
    evaluate.add_argument("--eps", type=_number, default=None,
                          help="l_inf budget, e.g. 8/255 (default: the checkpoint's)")
    evaluate.add_argument("--preset", default=None,
                          help="demo | paper (default: demo for mnist5k, else paper)")
    evaluate.add_argument("--method", default=None, help="pre-training method for the "
                          "hyper-parameter table (default: the checkpoint's)")
    evaluate.add_argument("--epochs", type=int, default=None,
                          help="fine-tuning epochs of every mode (milestones scale)")
    evaluate.add_argument("--post-process", action="store_true",
                          help='"++": k-means pseudo-labels, linear probe, TRADES (spec 7) first')
    evaluate.add_argument("--corruptions", choices=("auto", "on", "off"), default="auto",
                          help="CIFAR-10-C / 100-C accuracy (auto: when the files are there)")
    evaluate.add_argument("--autoattack-version", default=None,
                          help="standard (APGD-CE, APGD-T, FAB-T, Square) | custom | plus "
                          "(default: standard; the demo preset runs APGD-CE alone)")
    evaluate.add_argument("--autoattack-attacks", default=None,
                          help="with --autoattack-version custom: e.g. apgd-ce,apgd-t")
    evaluate.add_argument("--batch-size", type=int, default=256, help="test / attack batch")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    evaluate.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    evaluate.add_argument("--save", default=None, metavar="DIR",
                          help="keep each fine-tuned classifier in DIR as <mode>.safetensors + "
                          "<mode>.json, loadable with fastacl.load_classifier (docs/export.md)")
    evaluate.set_defaults(func=_evaluate)

    export = commands.add_parser(
        "export", help="write a checkpoint's encoder (one BN branch) as encoder.safetensors + "
        "model_card.json, loadable with fastacl.load_encoder (docs/export.md)"
    )
    export.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a fastacl checkpoint (fastacl train's checkpoint.pt or its run "
                        "directory) or a published ACL / DynACL / AIR checkpoint")
    export.add_argument("--out-dir", required=True, metavar="DIR",
                        help="the folder to write (created; an earlier export there is replaced)")
    export.add_argument("--branch", choices=BRANCHES, default="adv",
                        help="the BN branch the encoder keeps: adv (robust, the ACL family) or "
                        "normal (the only one of a 'cl' model) (default adv)")
    export.set_defaults(func=_export)

    bench = commands.add_parser(
        "bench", add_help=False,
        help="training-step throughput, fastacl vs the published-style baseline "
        "(benchmarks/bench_train_step.py; `fastacl bench --help` for its options)",
    )
    bench.set_defaults(func=_bench)  # its arguments go to the benchmark's own parser (main)
    return parser


# `fastacl bench` runs benchmarks/bench_train_step.py of a source checkout: the published-style
# baseline step it measures against is a yardstick beside the benchmarks, not library code, so
# it is not in the installed package. An installed package says so instead of failing on import.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench(args: argparse.Namespace) -> int:
    """Runs benchmarks/bench_train_step.py's main with the arguments after `bench`."""
    folder = BENCHMARKS_DIR
    script = folder / "bench_train_step.py"
    if not script.is_file():
        raise MissingFileError(
            f"fastacl bench runs benchmarks/bench_train_step.py from a source checkout (the "
            f"published-style baseline it measures against lives there, not in the installed "
            f"package); not found at {script}. Install fastacl from a clone with "
            "`pip install --no-build-isolation -e .` to use it"
        )
    sys.path.insert(0, str(folder))  # bench_train_step imports baseline_step beside it
    try:
        importlib.import_module("bench_train_step").main(args.bench_args)
    finally:
        sys.path.remove(str(folder))
    return 0


# OS errors a user can fix (a path that is missing, unwritable, full or of the wrong kind):
# one sentence each, like fastacl's own errors. Any other OSError is unexpected and keeps its
# traceback.
_FIXABLE_OS_ERRORS = {
    errno.ENOENT: "it does not exist",
    errno.EACCES: "permission denied: choose a path you can write, e.g. another --out-dir",
    errno.EPERM: "permission denied: choose a path you can write, e.g. another --out-dir",
    errno.EROFS: "the file system is read-only: choose another --out-dir",
    errno.ENOSPC: "no space left on the device: free some space or choose another --out-dir",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another --out-dir",
    errno.EISDIR: "it is a directory, where a file was expected",
    errno.ENOTDIR: "a part of the path is a file, where a directory was expected",
}
_WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _written_file(name) -> str:
    """The file a temporary one stands for (atomic writes go through .NAME.XXXX.tmp and
    NAME.tmp files): users know checkpoint.pt, not .checkpoint.pt.k2j1.tmp."""
    path = Path(os.fsdecode(name))
    for pattern in (r"\.(.+)\.[^.]+\.tmp", r"(.+)\.tmp(\.png)?"):
        match = re.fullmatch(pattern, path.name)
        if match:
            return str(path.with_name(match.group(1)))
    return str(path)


def _user_error(err: BaseException) -> str | None:
    """The one-sentence message for an error the user can fix, or None for a bug."""
    if isinstance(err, FastaclError):
        return str(err)
    if isinstance(err, OSError) and err.errno in _FIXABLE_OS_ERRORS:
        where = f" {_written_file(err.filename)}" if err.filename else ""
        text = f"cannot use{where}: {_FIXABLE_OS_ERRORS[err.errno]}"
        if err.errno in _WRITE_ERRORS:  # fastacl writes through temporary files and renames
            text += "; what was written before (the last checkpoint) is intact"
        return text
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug anywhere: show the traceback of an error that would otherwise be one sentence.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"]:  # everything after `bench` is the benchmark's own
        args = argparse.Namespace(command="bench", func=_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (FastaclError, OSError) as err:
        message = _user_error(err)
        if message is None or debug:
            raise
        print(f"fastacl: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
