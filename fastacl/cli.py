"""The `fastacl` command (also `python -m fastacl`)."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import fastacl
    from fastacl.ops import extension_status, requested_backend
    from fastacl.ops._dispatch import triton_available, triton_interpreter

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


# Help text and value type of every TrainConfig field that the command exposes.
_TRAIN_OPTIONS = {
    "method": (str, "cl | acl | acl-air | dynacl | dynacl-air (default acl)"),
    "preset": (str, "demo | paper (default: demo without --dataset, paper with one)"),
    "dataset": (str, "mnist5k (embedded demo) | cifar10 | cifar100 | stl10 | imagefolder"),
    "data_dir": (str, "folder holding the dataset files (see `fastacl.data.load_dataset`)"),
    "model": (str, "resnet18 | resnet18-small"),
    "epochs": (int, "number of epochs E (schedules scale with E)"),
    "batch_size": (int, "global batch size N (2N views)"),
    "lr": (float, "LARS base learning rate"),
    "weight_decay": (float, "LARS weight decay"),
    "warmup_epochs": (int, "LR warm-up epochs (default E/100, at least 1)"),
    "eps": (float, "l_inf attack budget in [0, 1] pixel units (paper 8/255 = 0.0314)"),
    "step_size": (float, "PGD step size"),
    "attack_steps": (int, "PGD steps"),
    "temperature": (float, "NT-Xent / SIR / AIR temperature"),
    "lambda1": (float, "SIR weight (default 0.5 for the AIR methods, else 0)"),
    "lambda2": (float, "AIR weight (default 0.5 for the AIR methods, else 0)"),
    "air_form": (str, "exact | reference-code"),
    "dynaug_period": (int, "DynAug period K in epochs (default E/20)"),
    "interpolation": (str, "bicubic | bilinear (RandomResizedCrop)"),
    "precision": (str, "fp32 | bf16 (autocast on CUDA, or on a CPU with AMX / AVX512-BF16)"),
    "compile_mode": (str, "torch.compile mode with --compile, e.g. reduce-overhead (CUDA "
                          "graphs)"),
    "seed": (int, "random seed"),
    "device": (str, "auto | cpu | cuda | cuda:N"),
    "out_dir": (str, "run directory (default runs/<method>-<dataset>-<timestamp>)"),
    "max_train": (int, "use only the first N training images"),
    "eval_epochs": (int, "epochs of the closing linear-probe evaluation"),
    "eval_max_test": (int, "test images for the closing evaluation"),
    "eval_eps": (float, "attack budget of the closing evaluation (default: --eps)"),
    "coreset": (str, "rcs | random: train on a coreset after a warm-up (default: all)"),
    "coreset_fraction": (float, "coreset fraction k in (0, 1) (default 0.2)"),
    "coreset_warmup": (int, "epochs on the full set before the first selection (default E/10)"),
    "coreset_interval": (int, "epochs between RCS selections (default E/50)"),
    "coreset_granularity": (str, "batch | sample: RCS picks minibatches or images"),
    "coreset_refresh": (str, "exact | cached: how RCS refreshes the validation gradient"),
    "coreset_refresh_every": (int, "cached refresh: re-attack U every m picks (default 20)"),
    "coreset_attack_steps": (int, "PGD steps of the RCS pass over the pool (default: "
                             "--attack-steps, the spec's 5; fewer: a cheaper round)"),
    "coreset_precision": (str, "fp32 | bf16: the RCS pool pass (default: --precision)"),
    "attack_precision": (str, "fp32 | bf16: the PGD attack alone (default: --precision)"),
    "coreset_divergence": (str, "minmax-kl | softmax-kl: the RD divergence"),
    "coreset_simulated_lr": (float, "eta' of the simulated head step (default 0.01)"),
    "coreset_simulated_steps": (int, "times the step is applied (2: the published code)"),
    "coreset_budget_rounding": (str, "truncate | floor (published: whole minibatches)"),
    "coreset_validation": (float, "share held out as the RCS validation set U (default 0.01)"),
}


def _train(args: argparse.Namespace) -> int:
    import fastacl.train as fastacl_train

    overrides = {name: getattr(args, name) for name in _TRAIN_OPTIONS
                 if getattr(args, name) is not None}
    for flag in ("channels_last", "compile", "fold_bn", "deterministic", "evaluate",
                 "clip_random_start", "sync_bn", "gather_negatives"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.resume:
        result = fastacl_train.train(resume=args.resume, **overrides)
    else:
        result = fastacl_train.train(**overrides)
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


def _eps_value(text: str) -> float:
    """--eps as a number or a fraction: 0.0314 or 8/255."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, "
                                         f"got {text!r}") from None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _evaluate(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from pathlib import Path

    from fastacl.finetune import evaluate

    corruptions = {"auto": "auto", "on": True, "off": False}[args.corruptions]
    result = evaluate(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, modes=args.modes,
        attacks=args.attacks, max_test=args.max_test, seed=args.seed, preset=args.preset,
        eps=args.eps, method=args.method, epochs=args.epochs, max_train=args.max_train,
        post_process=args.post_process, corruptions=corruptions,
        autoattack_version=args.autoattack_version,
        autoattack_attacks=args.autoattack_attacks, batch_size=args.batch_size,
        device=args.device,
    )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(descriptor, "w") as file:
            json.dump(result, file, indent=2)
        os.replace(temporary, path)
    attacks = result["attacks"]
    columns = ["standard acc."] + [{"pgd20": "PGD-20", "autoattack": "AutoAttack"}[a]
                                   for a in attacks]
    with_corruptions = any("corruptions" in r for r in result["modes"].values())
    if with_corruptions:
        columns.append("corruptions (mean)")
    print(f"\n{result['method']} checkpoint {result['checkpoint']} -> {result['dataset']}: "
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastacl",
        description="Fast adversarial contrastive learning: ACL, DynACL, AIR and RCS.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser(
        "info", help="versions, device, backend and how the C++ extension was loaded"
    )
    info.set_defaults(func=_info)

    train = commands.add_parser(
        "train", help="pre-train an encoder (no arguments: the demo on the embedded MNIST sample)"
    )
    for name, (kind, text) in _TRAIN_OPTIONS.items():
        train.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last memory format")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the PGD attack's forward/backward (static shapes; "
                       "the first step compiles)")
    train.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=None,
                       help="fold the eval-mode BN into the convolutions for the attack (default "
                       "on; the same function up to float rounding)")
    train.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                       help="bit-reproducible run (deterministic kernels, no TF32, fp32); "
                       "slower on CUDA")
    train.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                       help="quick SLF + PGD-20 evaluation at the end (default on)")
    train.add_argument("--clip-random-start", action=argparse.BooleanOptionalAction,
                       default=None, help="clip the PGD random start to [0, 1] (default on; "
                       "--no-clip-random-start reproduces the published code)")
    train.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                       help="under torchrun: synchronise BN statistics across ranks (default off)")
    train.add_argument("--gather-negatives", action=argparse.BooleanOptionalAction,
                       default=None, help="under torchrun: compute the losses on the global "
                       "batch, negatives from every rank (default on)")
    train.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the run in DIR from its last checkpoint")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "evaluate", help="fine-tune and test a pre-trained encoder: SLF / ALF / AFF, PGD-20, "
        "AutoAttack (spec section 8)"
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
    evaluate.add_argument("--eps", type=_eps_value, default=None,
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
    evaluate.set_defaults(func=_evaluate)

    bench = commands.add_parser(
        "bench", add_help=False,
        help="training-step throughput, fastacl vs the published-style baseline "
        "(benchmarks/bench_train_step.py; `fastacl bench --help` for its options)",
    )
    bench.set_defaults(func=_bench)  # its arguments go to the benchmark's own parser (main)
    return parser


def _bench(args: argparse.Namespace) -> int:
    """Runs benchmarks/bench_train_step.py's main: the baseline it compares with is a yardstick
    that lives beside the benchmarks in a source checkout, not in the installed package."""
    import importlib
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / "bench_train_step.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"fastacl bench runs benchmarks/bench_train_step.py from a source checkout (the "
            f"published-style baseline it measures against lives there, not in the installed "
            f"package); not found at {script}. Install fastacl from a clone with "
            "`pip install -e .` to use it"
        )
    sys.path.insert(0, str(folder))  # bench_train_step imports baseline_step beside it
    try:
        importlib.import_module("bench_train_step").main(args.bench_args)
    finally:
        sys.path.remove(str(folder))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` is the benchmark's own
        args = argparse.Namespace(command="bench", func=_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        # Bad input: say what is wrong, without a traceback.
        print(f"fastacl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
