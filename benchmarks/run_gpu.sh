#!/usr/bin/env bash
# The GPU tier and the GPU benchmarks, for anyone with a CUDA GPU and fastacl installed from a
# clone (README, Set-up, with a CUDA build of torch):
#
#   bash benchmarks/run_gpu.sh            # every stage (about 30 minutes on an H100)
#   bash benchmarks/run_gpu.sh tests      # only the GPU tests; also: train | backbones | ops |
#                                         # profile
#
# Each stage writes its full output to $OUT/<stage>.txt (OUT defaults to gpu-results/) and a
# line to $OUT/RESULTS.md: stage, exit status, last line. RESULTS.md starts with the device,
# torch / CUDA / triton versions, the commit and the date, so that every figure in it can be
# quoted with where and when it was measured. Every stage has a time limit (LIMIT seconds,
# default 900) so that one stuck benchmark does not hold the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-900}
mkdir -p "$OUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: torch sees no CUDA GPU; install a CUDA build of torch on a GPU machine" >&2
    exit 2
fi

summary="$OUT/RESULTS.md"
{
    echo "# fastacl GPU results"
    echo
    "$PY" - <<'PY'
import datetime, subprocess, torch, triton
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip() or "unknown"
print(f"- device: {torch.cuda.get_device_name()} (compute capability "
      f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")
print(f"- commit {commit}, {datetime.date.today().isoformat()}")
PY
    echo
    echo "| stage | exit | last line (full output in <stage>.txt) |"
    echo "|---|---|---|"
} > "$summary"
"$PY" -m fastacl info > "$OUT/info.json" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

run() {  # run NAME COMMAND...: output to $OUT/NAME.txt, a row in RESULTS.md
    local name=$1
    shift
    timeout "$LIMIT" "$@" > "$OUT/$name.txt" 2>&1
    local status=$?
    echo "| $name | $status | $(tail -1 "$OUT/$name.txt" | tr '|' '/') |" >> "$summary"
    echo "$name: exit $status"
}

stage() {
    case "$1" in
        tests)
            run gpu_tests "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider ;;
        train)  # fastacl's ACL-AIR step against the published-style step, same run
            run bench_train_step "$PY" -m fastacl bench --cases gpu-resnet18-32px \
                --json "$OUT/bench_train_step.json" ;;
        backbones)  # ACL-AIR images/s of every other registered backbone, batch 512
            run bench_backbones "$PY" -m fastacl bench --cases gpu-resnet34-32px \
                gpu-resnet50-32px gpu-wrn-28-10-32px gpu-wrn-34-10-32px gpu-vit-tiny-32px \
                gpu-vit-small-32px --json "$OUT/bench_backbones.json" ;;
        ops)  # each op against its plain-PyTorch form, with the fraction of the H100 bound
            run bench_nt_xent "$PY" benchmarks/bench_nt_xent.py
            run bench_sir_air "$PY" benchmarks/bench_sir_air.py
            run bench_attacks "$PY" -m pytest benchmarks/bench_attacks.py -m gpu -q -s ;;
        profile)
            run profile_step "$PY" benchmarks/profile_step.py --case gpu-resnet18-32px ;;
        *)
            echo "unknown stage $1: tests | train | backbones | ops | profile" >&2
            exit 2 ;;
    esac
}

if [ $# -eq 0 ]; then
    for name in tests train backbones ops profile; do stage "$name"; done
else
    for name in "$@"; do stage "$name"; done
fi
echo "results in $summary"
