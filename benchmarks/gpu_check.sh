#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run (a lent machine has ~15 minutes in all):
#   1. build invact from this tree into /tmp/invact-site (no network: --no-deps, no build isolation;
#      the machine's own torch and triton),
#   2. tests/test_cuda.py on 8 processes (each size class of each kernel is a Triton compile): the
#      compiled Triton kernels against the torch backend (fitted tables bit for bit), channels-last,
#      a second device, 2**31 + 4099 elements,
#   2b. the norms there too (tests/test_cuda.py: Triton LayerNorm/RMSNorm forward and backward against
#      float64 autograd within invact.norm_bounds.error_bound; y saved, not x),
#   3. the issue's GPU benchmark: Triton forward/backward at 2**28 bfloat16 and float32 elements (the
#      16-bit lookup and the float32 scheme with its segment search) against a copy's
#      bandwidth and PyTorch's native op, timed between CUDA events over back-to-back calls
#      (benchmarks/activations.py's side_by_side: without the host's per-call overhead),
#      after the estimate of the fitted backwards and of every forward from their code
#      (benchmarks/ptx_estimate.py: SASS instructions, loads and registers per element -> estimated
#      time against the memory time, with this GPU's SMs and bandwidth; the same figures offline in
#      tests/test_ptx_estimate.py).
# Usage: bash benchmarks/gpu_check.sh     (logs also go to $OUT, or /tmp/invact-gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/invact-gpu}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/invact-site . \
    >"$out/install.txt" 2>&1 || { cat "$out/install.txt"; exit 1; }
export PYTHONPATH=/tmp/invact-site PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$out/versions.txt"
status=0
python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt" || status=1
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")
for dtype in bfloat16 float32; do
    for kind in "" --forward; do
        python3 benchmarks/ptx_estimate.py --numel 268435456 --arch "$arch" --dtype $dtype $kind 2>&1 \
            | tee -a "$out/ptx_estimate.txt" || status=1
    done
done
python3 benchmarks/activations.py --numel 268435456 --dtypes bfloat16,float32 --devices cuda 2>&1 \
    | tee "$out/benchmark.txt" || status=1
# the norms' bandwidth against a copy's and their time against torch.nn.functional's: (32768, 4096),
# 2**27 elements (256 MiB in bfloat16)
python3 benchmarks/activations.py --norms 32768,4096 --dtypes bfloat16,float32 --devices cuda 2>&1 \
    | tee "$out/norms.txt" || status=1
exit $status
