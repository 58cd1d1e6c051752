"""The Triton kernels compile for sm_80 and sm_90 without a GPU, and none of them spills.

Triton's compiler needs no driver: ASTSource -> ttir -> ttgir -> llir -> ptx -> cubin, the last
step with the ptxas bundled in the triton wheel. This module drives the real launchers
(kernels/*.py) on CPU tensors at the shapes fastacl runs, with every kernel launch intercepted
(`kernel[grid](...)` records its arguments instead of running), so the configurations compiled
are exactly those a GPU launch would pick: block sizes, num_warps, constexprs, dtypes, the tf32 /
ieee dot paths, and Triton's divisibility specialisation of the pointer and integer arguments.
Each distinct specialisation is compiled for each target, and the test fails on a compile error,
any register spill, more than 255 registers, shared memory over the target's per-block limit, or
a tensor-core path (bf16, tf32) whose PTX has no mma instruction. Without a driver nothing else
checks shared memory against the target, so this does.

It relies on Triton internals (JITFunction's binder and _pack_args, the ptxas log format), hence
the pin triton==3.9.* in pyproject.toml and the skip on another major.minor.

Compilation runs in worker processes with TRITON_INTERPRET unset (tests/conftest.py sets it for
this process before any kernel is imported, which turns every kernel into an interpreted
function), each compile under a time limit (ptxas can run for minutes on a huge tile), with a
fresh Triton cache in a temporary directory.

    python -m pytest tests/ops/test_triton_compile.py -q        the check
    python -m tests.ops.test_triton_compile --table              the table, as markdown
    python -m tests.ops.test_triton_compile --update docs/gpu-compile.md --section after
    git archive HEAD kernels | tar -x -C /tmp/old && \\
    python -m tests.ops.test_triton_compile --kernels-from /tmp/old/kernels --update \\
        docs/gpu-compile.md --section before          the same for another version of kernels/
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPOSITORY / "kernels"
KERNEL_MODULES = ("nt_xent", "sir_air", "pgd_step")
TRITON_SERIES = "3.9"  # the pin in pyproject.toml

# Compute capability -> the most dynamic shared memory one block may opt in to (CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability": 163 KiB on 8.0, 227 KiB
# on 9.0). The 8.x configs also run on 8.6 / 8.9 (99 KiB), so they are held to that as well.
TARGETS = {"sm_80": (8, 0), "sm_90": (9, 0)}
SHARED_MEMORY_LIMIT = {"sm_80": 166_912, "sm_90": 232_448}
SHARED_MEMORY_LIMIT_8X = 101_376  # sm_86 / sm_89
MAX_REGISTERS = 255
COMPILE_TIMEOUT_S = 180  # one kernel; a normal one takes 0.5-10 s on a CPU core

# The shapes fastacl runs (benchmarks/bench_nt_xent.py, bench_sir_air.py, bench_attacks.py): a
# batch of N = 512 pairs of d = 128 (the projection head's width) or 512 (its input); PGD on both
# views of a [256, 3, 32, 32] CIFAR batch. N only enters the specialisation through its
# divisibility by 16, so larger benchmark batches compile to the same kernels.
BATCH = 512
WIDTHS = (128, 512)
IMAGES = (2 * 256, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Driving the launchers (runs in a worker, where the kernels are JITFunctions)


def _load_kernels(kernels_dir: Path) -> dict:
    """The kernel modules of kernels_dir, imported as a standalone package (not fastacl.kernels,
    so that another version of kernels/ can be compiled, and fastacl is not imported)."""
    package = "kernels_under_compile"
    spec = importlib.util.spec_from_file_location(
        package, kernels_dir / "__init__.py", submodule_search_locations=[str(kernels_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return {name: importlib.import_module(f"{package}.{name}") for name in KERNEL_MODULES}


def _call(launcher, *args, capability, **kwargs):
    """launcher(*args, **kwargs), asking for the target's configs where the launcher picks them
    by capability (an older kernels/ may not)."""
    if "capability" in inspect.signature(launcher).parameters:
        kwargs["capability"] = capability
    return launcher(*args, **kwargs)


def drive_launchers(kernels: dict, capability: tuple[int, int], note, grad_norm_floor: float):
    """Every launcher at fastacl's shapes, dtypes and dot paths; note(label) names the launches
    that follow. Outputs are never computed (the launches are intercepted)."""
    import torch

    nt_xent, sir_air, pgd_step = kernels["nt_xent"], kernels["sir_air"], kernels["pgd_step"]
    empty = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype)
    matmul = torch.backends.cuda.matmul
    allow_tf32 = matmul.allow_tf32
    try:
        for d in WIDTHS:
            for name, dtype, tf32 in [("fp32 ieee", torch.float32, False),
                                      ("fp32 tf32", torch.float32, True),
                                      ("bf16", torch.bfloat16, False)]:  # fmt: skip
                matmul.allow_tf32 = tf32  # what the launchers read to pick the fp32 dot path
                note(f"nt_xent {name} d={d}")
                z1, z2 = empty(BATCH, d, dtype=dtype), empty(BATCH, d, dtype=dtype)
                _, lse = _call(nt_xent.nt_xent_forward, z1, z2, 0.5, capability=capability)
                _call(nt_xent.nt_xent_backward, empty(), z1, z2, lse, 0.5, capability=capability)
    finally:
        matmul.allow_tf32 = allow_tf32
    for d in WIDTHS:
        for dtype_name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
            for op, natural in [("sir", 0), ("air", 2)]:
                for exact in (True, False):
                    note(f"{op} {dtype_name} d={d}")
                    z = [empty(BATCH, d, dtype=dtype) for _ in range(3 + natural)]
                    views, natural_views = tuple(z[1:3]), tuple(z[3:])
                    _call(sir_air.sir_air_forward, z[0], views, natural_views, 0.5, exact,
                          capability=capability)  # fmt: skip
                    _call(sir_air.sir_air_backward, empty(), z[0], views, natural_views, 0.5,
                          exact, capability=capability)  # fmt: skip
    for dtype_name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        note(f"pgd_step {dtype_name} {list(IMAGES)}")
        x_adv, grad, x_nat = (empty(*IMAGES, dtype=dtype) for _ in range(3))
        _call(pgd_step.pgd_step_linf_, x_adv, grad, x_nat, 8 / 255, 2 / 255,
              capability=capability)  # fmt: skip
        _call(pgd_step.pgd_step_l2_, x_adv, grad, x_nat, 0.5, 0.1, grad_norm_floor,
              capability=capability)  # fmt: skip


def record_launches(kernels: dict, target: str, grad_norm_floor: float) -> list[dict]:
    """The distinct kernel specialisations the launchers ask for on `target`, in launch order:
    each with what JITFunction.run would hand to triton.compile on that GPU."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    major, minor = TARGETS[target]
    gpu = GPUTarget("cuda", 10 * major + minor, 32)
    backend = make_backend(gpu)
    launches: dict[str, dict] = {}
    label = [""]

    def recorder(fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):  # JITFunction.run, up to the compile
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, kwargs, bound_args, specialization, options
            )
            key = repr((fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                        sorted(options.__dict__.items())))  # fmt: skip
            launch = launches.setdefault(key, {
                "kernel": fn.__name__, "fn": fn, "signature": signature, "constexprs": constexprs,
                "attrs": attrs, "options": options, "target": target, "gpu": gpu, "from": [],
            })  # fmt: skip
            if label[0] not in launch["from"]:
                launch["from"].append(label[0])

        return run

    jit_functions = [
        value
        for module in kernels.values()
        for value in vars(module).values()
        if isinstance(value, JITFunction)
    ]
    if not jit_functions:
        raise RuntimeError("no JITFunction in the kernel modules: is the interpreter on?")
    for fn in jit_functions:
        fn.run = recorder(fn)
    try:
        drive_launchers(kernels, TARGETS[target], lambda text: label.__setitem__(0, text),
                        grad_norm_floor)  # fmt: skip
    finally:
        for fn in jit_functions:
            del fn.run
    launched = {launch["kernel"] for launch in launches.values()}
    never = sorted(f.__name__ for f in jit_functions
                   if f.__name__.endswith("_kernel") and f.__name__ not in launched)  # fmt: skip
    if never:
        raise RuntimeError(f"kernels never launched by drive_launchers: {', '.join(never)}")
    return list(launches.values())


def _config(launch: dict) -> str:
    names = launch["fn"].arg_names
    parts = [f"{names[path[0]]}={value}" for path, value in sorted(launch["constexprs"].items())]
    options = launch["options"]
    parts += [f"num_warps={options.num_warps}", f"num_stages={options.num_stages}"]
    return " ".join(parts)


def _input_dtype(launch: dict) -> str:
    """The element type of the kernel's first pointer argument (what the launch was for)."""
    pointers = [t for t in launch["signature"].values() if isinstance(t, str) and t[0] == "*"]
    return pointers[0][1:] if pointers else "-"


def describe(launch: dict) -> dict:
    """What names a launch in the table."""
    return {
        "kernel": launch["kernel"],
        "input": _input_dtype(launch),
        "config": _config(launch),
        "target": launch["target"],
        "from": launch["from"],
    }


def compile_launch(launch: dict) -> dict:
    """Compile one specialisation; registers and spills from the ptxas log, shared memory from
    the compiler's allocation (what the launch would request), mma from the PTX."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log to stdout
    knobs.compilation.always_compile = True
    row = describe(launch)
    source = ASTSource(launch["fn"], launch["signature"], launch["constexprs"], launch["attrs"])
    log = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=launch["gpu"],
                                      options=launch["options"].__dict__)  # fmt: skip
    except Exception as error:  # a compile error is a result, reported by the test
        return {**row, "error": f"{type(error).__name__}: {str(error)[:2000]}"}
    row["seconds"] = round(time.perf_counter() - started, 1)
    text = log.getvalue()
    found = {
        name: re.search(pattern, text)
        for name, pattern in [("registers", r"Used (\d+) registers"),
                              ("spill_stores", r"(\d+) bytes spill stores"),
                              ("spill_loads", r"(\d+) bytes spill loads")]  # fmt: skip
    }
    if not all(found.values()):
        return {**row, "error": f"no register / spill figures in the ptxas log:\n{text[-2000:]}"}
    row.update({name: int(match.group(1)) for name, match in found.items()})
    row["shared"] = compiled.metadata.shared
    row["tensor_cores"] = bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"]))
    return row


def _worker(args) -> None:
    """Compile this worker's share of the launches; one JSON line as each starts and ends."""
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    import triton
    from triton.runtime.jit import JITFunction

    kernels = _load_kernels(Path(args.kernels_from))
    probe = kernels["pgd_step"].pgd_step_linf_kernel
    if not isinstance(probe, JITFunction):
        print(json.dumps({"skip": f"the kernels are {type(probe).__name__}s, not JITFunctions: "
                                  "the interpreter is forced on (triton.knobs.runtime.interpret="
                                  f"{triton.knobs.runtime.interpret})"}), flush=True)  # fmt: skip
        return
    launches = [
        launch
        for target in args.targets
        for launch in record_launches(kernels, target, args.grad_norm_floor)
    ]
    for index in range(args.share, len(launches), args.shares)[args.skip:]:
        print(json.dumps({"start": index, **describe(launches[index])}), flush=True)
        print(json.dumps({"done": index, **compile_launch(launches[index])}), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: workers, time limits, the table


def _run_share(share: int, shares: int, options: list[str], env: dict, timeout_s: float,
               log_dir: Path) -> list[dict]:  # fmt: skip
    """Rows of one worker's share; a compile past timeout_s kills the worker, is reported as an
    error, and a new worker goes on from the next launch."""
    rows: list[dict] = []
    while True:
        stderr_path = log_dir / f"worker{share}-{len(rows)}.log"
        command = [sys.executable, "-m", "tests.ops.test_triton_compile", "--worker",
                   "--share", str(share), "--shares", str(shares), "--skip", str(len(rows)),
                   *options]  # fmt: skip
        with open(stderr_path, "w") as stderr:
            # its own process group, so that a kill also ends the ptxas it may be waiting on
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                       env=env, cwd=REPOSITORY, start_new_session=True)  # fmt: skip

            def kill(pid=process.pid):
                with contextlib.suppress(ProcessLookupError):  # it may have just finished
                    os.killpg(pid, signal.SIGKILL)

            timer, current = None, None
            for line in process.stdout:
                event = json.loads(line)
                if timer is not None:
                    timer.cancel()
                if "skip" in event:
                    rows.append(event)
                elif "start" in event:
                    current = event
                    timer = threading.Timer(timeout_s, kill)
                    timer.start()
                else:
                    rows.append(event)
                    current = None
            if timer is not None:
                timer.cancel()
            process.wait()
        if current is None and process.returncode == 0:
            return rows
        tail = stderr_path.read_text()[-3000:]
        if current is None:
            raise RuntimeError(f"compile worker failed (exit {process.returncode}):\n{tail}")
        killed = process.returncode == -signal.SIGKILL
        reason = (f"no result within {timeout_s:.0f} s: killed" if killed
                  else f"worker died (exit {process.returncode}):\n{tail}")  # fmt: skip
        index = current.pop("start")
        rows.append({"done": index, **current, "error": reason})


def compile_all(kernels_from: Path = KERNELS_DIR, targets=tuple(TARGETS), workers: int = 2,
                timeout_s: float = COMPILE_TIMEOUT_S) -> list[dict]:  # fmt: skip
    """Every distinct launch compiled for every target, as table rows (launch order)."""
    from fastacl.ops.pgd_step import GRAD_NORM_FLOOR

    with tempfile.TemporaryDirectory(prefix="fastacl-triton-compile-") as scratch:
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=str(Path(scratch) / "cache"), TRITON_ALWAYS_COMPILE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY),
                                                            env.get("PYTHONPATH")])))  # fmt: skip
        options = ["--kernels-from", str(kernels_from), "--grad-norm-floor",
                   repr(GRAD_NORM_FLOOR), "--targets", *targets]  # fmt: skip
        results: list[list[dict]] = [[] for _ in range(workers)]
        errors: list[BaseException] = []

        def run(share):
            try:
                results[share] = _run_share(share, workers, options, env, timeout_s,
                                            Path(scratch))  # fmt: skip
            except BaseException as error:  # re-raised in this thread below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(share,)) for share in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    rows = [row for share in results for row in share]
    return sorted(rows, key=lambda row: row.get("done", -1))


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled launch (empty when nothing is)."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills: {row['spill_stores']} B stores, {row['spill_loads']} B loads")
    if row["registers"] > MAX_REGISTERS:
        found.append(f"{row['registers']} registers > {MAX_REGISTERS}")
    limit = SHARED_MEMORY_LIMIT[row["target"]]
    if row["target"] == "sm_80":
        limit = min(limit, SHARED_MEMORY_LIMIT_8X)
    if row["shared"] > limit:
        found.append(f"{row['shared']} B of shared memory > {limit} B")
    similarity_kernel = row["kernel"] in ("_nt_xent_forward_kernel", "_nt_xent_backward_kernel")
    tensor_core_path = similarity_kernel and (
        row["input"] in ("bf16", "fp16") or "DOT_PRECISION=tf32" in row["config"]
    )
    if tensor_core_path and not row["tensor_cores"]:
        found.append("a bf16 / tf32 dot without mma instructions (no tensor cores)")
    return found


def markdown_table(rows: list[dict]) -> str:
    header = ("kernel", "input", "config", "target", "registers", "spill stores (B)",
              "shared (B)", "mma", "launched for")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: (r["kernel"], r["input"], r["config"], r["target"])):
        if "error" in row:
            cells = (row["kernel"], row["input"], row["config"], row["target"], "error", "-", "-",
                     "-", "; ".join(row["from"]))  # fmt: skip
        else:
            flag = lambda bad, text: f"**{text}**" if bad else str(text)
            cells = (f"`{row['kernel']}`", row["input"], f"`{row['config']}`", row["target"],
                     flag(row["registers"] > MAX_REGISTERS, row["registers"]),
                     flag(row["spill_stores"] > 0, row["spill_stores"]),
                     flag(any("shared" in p for p in problems(row)), row["shared"]),
                     "yes" if row["tensor_cores"] else "no", "; ".join(row["from"]))  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def update_section(path: Path, section: str, text: str) -> None:
    """Replace what lies between <!-- BEGIN compile-table:section --> and its END marker."""
    begin, end = f"<!-- BEGIN compile-table:{section} -->", f"<!-- END compile-table:{section} -->"
    document = path.read_text()
    if begin not in document or end not in document:
        raise SystemExit(f"{path} has no {begin} ... {end} block to replace")
    head, rest = document.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def _skip_reason() -> str | None:
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    series = ".".join(triton.__version__.split(".")[:2])
    if series != TRITON_SERIES:
        return (f"triton {triton.__version__} is installed; this check relies on the internals "
                f"and the bundled ptxas of triton {TRITON_SERIES}.x (pinned in pyproject.toml)")
    from triton.backends import backends

    if "nvidia" not in backends:
        return "this triton has no NVIDIA backend to compile with"
    return None


# ---------------------------------------------------------------------------------------------
# The test


@pytest.mark.slow  # about a minute on 2 CPU cores: ~60 compiles, two workers
def test_every_launch_compiles_for_sm80_and_sm90_without_spills():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    rows = compile_all(workers=max(1, min(2, os.cpu_count() or 1)))
    skipped = [row["skip"] for row in rows if "skip" in row]
    if skipped:
        pytest.skip(skipped[0])
    assert rows, "no launch was recorded"
    assert {row["target"] for row in rows} == set(TARGETS), "a target compiled nothing"
    failures = [
        f"{row['kernel']} [{row['input']}, {row['config']}] on {row['target']} "
        f"(for {'; '.join(row['from'])}): {'; '.join(found)}"
        for row in rows
        if (found := problems(row))
    ]
    assert not failures, "\n".join(failures) + "\n\n" + markdown_table(rows)


def test_problems_finds_spills_registers_shared_memory_and_lost_tensor_cores():
    """The verdict on one compiled launch, on made-up figures (nothing is compiled)."""
    clean = {"kernel": "_nt_xent_forward_kernel", "input": "bf16", "target": "sm_80",
             "config": "BLOCK_M=64 DOT_PRECISION=ieee num_warps=4", "from": [], "registers": 168,
             "spill_stores": 0, "spill_loads": 0, "shared": 32768, "tensor_cores": True}
    assert problems(clean) == []
    assert "spills" in problems({**clean, "spill_stores": 16, "spill_loads": 16})[0]
    assert "registers" in problems({**clean, "registers": 256})[0]
    # over 8.6's 99 KiB, which the sm_80 configs also run on; within sm_90's 227 KiB
    assert "shared memory" in problems({**clean, "shared": 120_000})[0]
    assert problems({**clean, "target": "sm_90", "shared": 120_000}) == []
    assert "shared memory" in problems({**clean, "target": "sm_90", "shared": 240_000})[0]
    assert "tensor cores" in problems({**clean, "tensor_cores": False})[0]
    assert problems({**clean, "input": "fp32", "tensor_cores": False}) == []  # ieee: FMAs
    tf32 = {**clean, "input": "fp32", "config": "DOT_PRECISION=tf32", "tensor_cores": False}
    assert "tensor cores" in problems(tf32)[0]
    assert problems({**clean, "error": "PTXASError: ..."}) == ["PTXASError: ..."]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="print the table as markdown")
    parser.add_argument("--update", type=Path, help="write the table into this markdown file")
    parser.add_argument("--section", default="after", help="which marked block of --update")
    parser.add_argument("--kernels-from", type=Path, default=KERNELS_DIR)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shares", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--skip", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--grad-norm-floor", type=float, default=1e-12, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    reason = _skip_reason()
    if reason:
        raise SystemExit(reason)
    started = time.perf_counter()
    rows = compile_all(args.kernels_from.resolve(), args.targets, args.workers)
    if any("skip" in row for row in rows):
        raise SystemExit(next(row["skip"] for row in rows if "skip" in row))
    import triton

    table = markdown_table(rows)
    bad = sum(bool(problems(row)) for row in rows)
    summary = f"{len(rows)} compiles (triton {triton.__version__}), {bad} with a problem."
    if args.update:
        update_section(args.update, args.section, f"{table}\n\n{summary}")
    if args.table or not args.update:
        print(table)
        print()
    print(f"{summary} {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
