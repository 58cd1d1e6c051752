#!/usr/bin/env bash
# The GPU work of a session lent a GPU machine, one stage per call (each fits the device tool's
# 10-minute command limit); outputs go to $OUT (the device tool's folder that comes back).
#
#   here:   pip download mlxtend pyautoattack --no-deps -d wheels   # the GPU image lacks these
#   device: bash benchmarks/gpu_session.sh tests     (carry: ["wheels"])
#           bash benchmarks/gpu_session.sh train     # fastacl bench, ACL-AIR step, batch 512
#           bash benchmarks/gpu_session.sh ops       # NT-Xent, SIR / AIR, the attack
#           bash benchmarks/gpu_session.sh profile   # profile_step on the GPU case
#
# Every stage first installs fastacl (editable, built against the machine's own CUDA torch,
# no dependency fetched) and writes `fastacl info`. Record what comes back in RESULTS.md with
# the device, commit, date and ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
stage=${1:-tests}

if [ -d wheels ]; then
    "$PY" -m pip install --no-index --no-deps -q wheels/*.whl || exit 1
fi
"$PY" -m pip install --no-build-isolation --no-deps -q -e . > "$OUT/install.txt" 2>&1 \
    || { tail -20 "$OUT/install.txt"; exit 1; }
"$PY" -m fastacl info > "$OUT/info.json" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

run() {  # run NAME TIMEOUT COMMAND...: output to $OUT/NAME.txt, its status printed
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $? ($(tail -1 "$OUT/$name.txt"))"
}

case "$stage" in
    tests)
        run gpu_tests 540 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider ;;
    train)
        run bench_train_step 540 "$PY" -m fastacl bench --cases gpu-resnet18-32px \
            --json "$OUT/bench_train_step.json" ;;
    ops)
        run bench_nt_xent 150 "$PY" benchmarks/bench_nt_xent.py
        run bench_sir_air 120 "$PY" benchmarks/bench_sir_air.py
        run bench_attacks 120 "$PY" -m pytest benchmarks/bench_attacks.py -m gpu -q -s ;;
    profile)
        run profile_step 540 "$PY" benchmarks/profile_step.py --case gpu-resnet18-32px ;;
    *)
        echo "unknown stage $stage: tests | train | ops | profile" >&2
        exit 2 ;;
esac
