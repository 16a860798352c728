#!/usr/bin/env bash
# GPU evidence, on a machine with a CUDA GPU and a CUDA torch: build hires_lmm for this GPU, run the
# GPU tests, the benchmark and compute-sanitizer over bench/sanitize_smoke.py, and write bench/results/<date>-<gpu>-<commit>.{json,md,png}
# (also copied to $OUT when set). Commit those files: they are the only evidence that the CUDA
# kernels work and how fast they are.
#   bash bench/gpu_validate.sh            # everything
#   HIRES_LMM_BENCH_ARGS="--only deepstack" bash bench/gpu_validate.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
commit=${HIRES_LMM_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export HIRES_LMM_COMMIT=$commit

# CUTLASS headers: an installed nvidia-cutlass, else the wheel carried in .whl/ (third_party/README.md).
if ! "$PY" -c "import cutlass_library" 2>/dev/null && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/hires-site .whl/nvidia_cutlass-*.whl
  export PYTHONPATH=/tmp/hires-site${PYTHONPATH:+:$PYTHONPATH}
fi

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ','').replace(' ','-'))") || {
  echo "gpu_validate: no CUDA device visible"; exit 1; }
# Build only for this GPU (half the compile time of the default 8.0+PTX;9.0a): sm_90a on Hopper,
# where the mma.sync kernels and the opt-in sm_90a ones both compile.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
stem="bench/results/$(date +%F)-${gpu}-${commit}"
mkdir -p bench/results
log="$stem.log"

echo "== build ($gpu, commit $commit)" | tee "$log"
t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --no-build-isolation --no-deps . >>"$log" 2>&1 || {
  tail -40 "$log"; echo "gpu_validate: build failed"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$log"
cd /tmp  # import the installed package, not the source tree
"$PY" -m hires_lmm info 2>&1 | tee -a "$OLDPWD/$log"   # build metadata, and whether it covers this GPU
cd "$OLDPWD"

echo "== pytest -m gpu" | tee -a "$log"
"$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --rootdir=. tests 2>&1 | tee "$stem.pytest.txt" | tail -30
test_rc=${PIPESTATUS[0]}

echo "== benchmark" | tee -a "$log"
"$PY" -m hires_lmm.bench --device cuda --json "$stem.json" --plot "$stem.png" ${HIRES_LMM_BENCH_ARGS:-} 2>&1 | tee "$stem.bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "== compute-sanitizer (memcheck, racecheck) over bench/sanitize_smoke.py" | tee -a "$log"
san_rc=0
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 1 "$PY" bench/sanitize_smoke.py >>"$stem.sanitizer.txt" 2>&1 || san_rc=1
    echo "$tool: rc=$san_rc" | tee -a "$stem.sanitizer.txt"
  done
else
  "$PY" bench/sanitize_smoke.py >"$stem.sanitizer.txt" 2>&1 || san_rc=1
  echo "compute-sanitizer not found; smoke run without it: rc=$san_rc" | tee -a "$stem.sanitizer.txt"
fi
tail -3 "$stem.sanitizer.txt"

"$PY" -m hires_lmm.bench.report "$stem.json" --pytest "$stem.pytest.txt" > "$stem.md"
if [ -n "${OUT:-}" ]; then
  cp "$stem".json "$stem".md "$stem".png "$stem".bench.txt "$stem".pytest.txt "$stem".sanitizer.txt "$log" "$OUT"/ 2>/dev/null
fi
echo "gpu_validate: tests rc=$test_rc, bench rc=$bench_rc, sanitizer rc=$san_rc -> $stem.{json,md,png}"
exit $(( test_rc != 0 || bench_rc != 0 || san_rc != 0 ))
