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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
