#!/usr/bin/env bash
# Everything the GPU checks of issue 16 need, in one call of about eight minutes on a lent device:
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                    --platform manylinux2014_x86_64 -d .whl diffusers==$(python -c 'import diffusers; print(diffusers.__version__)')
#   device run:  bash benchmarks/gpu.sh        (carry: .whl)
# Installs what the device image lacks (diffusers) from the carried wheels, then runs the bit-identity
# oracle, the fused op against the composite, and the overhead benchmark eager and compiled. Writes
# every log and result under benchmarks/results/<device>/ (and under $OUT when the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" || exit 1
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
device=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else "cpu")')
out="benchmarks/results/$device"
mkdir -p "$out"
status=0
step() {  # name, timeout in seconds, command...: one log per step; a failing step does not stop the others
    local name=$1 limit=$2; shift 2
    echo "== $name" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log" | tee -a "$out/summary.txt"
    # each overhead run writes benchmarks/results/overhead_full_cuda_<sections>.json: keep a copy per step
    [[ $name == overhead_* ]] && cp benchmarks/results/overhead_full_cuda_*.json "$out/" 2>/dev/null
    echo "== $name: exit $rc" | tee -a "$out/summary.txt"
    [ $rc -eq 0 ] || status=1
}
: >"$out/summary.txt"
step fused_check 90 python3 -m benchmarks.fused_check --device cuda
step oracle 60 python3 -m benchmarks.oracle --device cuda
step overhead_eager 120 python3 -m benchmarks.overhead --device cuda --only diffusion --only llm
step overhead_compiled 120 python3 -m benchmarks.overhead --device cuda --only compiled --repeats 3
step overhead_families 120 python3 -m benchmarks.overhead --device cuda --only families --repeats 3 --steps 4
if [ -n "${OUT:-}" ]; then cp -r "$out" "$OUT/"; fi
exit $status
