#!/usr/bin/env bash
# GPU device check for a machine WITHOUT internet (issue 14). Run from a checkout with node_modules
# installed (`npm ci` with the repo's .npmrc skips onnxruntime-node's CUDA download):
#
#   scripts/gpu-check.sh            # or: ORT_CUDA_LIBS=/path/to/capi scripts/gpu-check.sh
#
# 1. Makes onnxruntime-node's CUDA execution provider loadable. onnxruntime-node dlopens
#    libonnxruntime_providers_shared.so and libonnxruntime_providers_cuda.so from its own folder
#    (node_modules/onnxruntime-node/bin/napi-v6/linux/x64/), next to its libonnxruntime.so.1. If they
#    are not there already (the container image's install puts them there), they are copied from,
#    in order: $ORT_CUDA_LIBS; the `capi/` folder of an installed Python onnxruntime-gpu of the SAME
#    version as onnxruntime-node (provider libraries are ABI-bound to their libonnxruntime).
#    The CUDA 12 runtime, cuBLAS and cuDNN 9 must be loadable: the script adds /usr/local/cuda and
#    the lib folders of pip's nvidia-* wheels (as onnxruntime-gpu installs them) to LD_LIBRARY_PATH.
# 2. Probes the provider the way the service does (src/model/placement.ts) and stops with the
#    reason and the provider library's missing dependencies when it does not load.
# 3. Runs the reference-equality tests on CUDA (LORASERVE_TEST_DEVICE=cuda) with the defaults a
#    server gets (RUNTIME=auto → the C API runner for the KV=gqa graph, its cache in CUDA memory
#    through capiKvBuffers): test/engine-device (fp32 ≤ 2e-3 — TF32 may be on — and fp16 ≤ 5e-2
#    against the reference forward), test/engine-batching (batched = alone, mixed adapters, fp16 vs
#    fp32), test/engine-transfer, test/gqa-device-kv (GroupQueryAttention over device buffers at
#    fp16: in-place writes, moves, growth, snapshot/restore read back from the device) and
#    test/capi-session; then engine-device and engine-batching through onnxruntime-node
#    (LORASERVE_TEST_RUNTIME=node, host buffers). The tests build their graphs without a provider,
#    so their fp32 gqa graphs run CUDA-less GroupQueryAttention on the CPU provider (slow, still
#    checked); a server builds fp32 on cuda as resident (src/model/build.ts, BuildOptions.provider).
# 4. Runs `npm run bench -- --preset qwen2.5-0.5b` with DEVICE=cuda (DTYPE=auto: fp16, so KV=gqa;
#    DTYPE=fp32 builds resident, the build log says why) and prints
#    tokens/s at batch 1 and 8 and the decode step-time ratio between context 2048 and 128.
#
# Environment: ORT_CUDA_LIBS (a folder holding the two provider libraries), PYTHON (default: python3,
# then python), GPU_CHECK_OUT (default ./data/gpu-check: logs and the bench JSON), SKIP_TESTS=1,
# SKIP_BENCH=1, BENCH_ARGS (extra bench flags, e.g. "--quick"). Exit status: 0 when every step ran
# and passed; otherwise the step that failed says why.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${GPU_CHECK_OUT:-$ROOT/data/gpu-check}
mkdir -p "$OUT"

say() { printf '[gpu-check] %s\n' "$*"; }
die() {
  printf '[gpu-check] FAILED: %s\n' "$*" >&2
  exit 1
}

command -v node >/dev/null || die "node is not on PATH"
ORT_PKG=$ROOT/node_modules/onnxruntime-node
[[ -f $ORT_PKG/package.json ]] || die "node_modules/onnxruntime-node is missing: run npm ci first"
ORT_VERSION=$(node -p "require('$ORT_PKG/package.json').version")
ARCH_DIR=$(node -p "process.arch")
BIN_DIR=$ORT_PKG/bin/napi-v6/linux/$ARCH_DIR
[[ -f $BIN_DIR/libonnxruntime.so.1 ]] || die "no libonnxruntime.so.1 in $BIN_DIR"
PROVIDER_LIBS=(libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so)
say "onnxruntime-node $ORT_VERSION, providers folder $BIN_DIR"

have_providers() {
  local dir=$1 lib
  for lib in "${PROVIDER_LIBS[@]}"; do
    [[ -f $dir/$lib ]] || return 1
  done
}

# ── 1. the CUDA provider libraries ────────────────────────────────────────────────────────────
PYTHON_BIN=""
for candidate in ${PYTHON:-} python3 python; do
  if command -v "$candidate" >/dev/null 2>&1; then
    PYTHON_BIN=$candidate
    break
  fi
done

if have_providers "$BIN_DIR"; then
  say "the CUDA provider is already in onnxruntime-node's folder (the container's install)"
else
  SOURCE=""
  if [[ -n ${ORT_CUDA_LIBS:-} ]]; then
    have_providers "$ORT_CUDA_LIBS" || die "ORT_CUDA_LIBS=$ORT_CUDA_LIBS lacks ${PROVIDER_LIBS[*]}"
    SOURCE=$ORT_CUDA_LIBS
    say "taking the provider libraries from ORT_CUDA_LIBS (make sure they are onnxruntime $ORT_VERSION's)"
  elif [[ -n $PYTHON_BIN ]]; then
    # onnxruntime-gpu installs as the module `onnxruntime`; its capi/ holds the provider libraries
    if PY_INFO=$("$PYTHON_BIN" -c 'import os, onnxruntime as o; print(o.__version__); print(os.path.join(os.path.dirname(o.__file__), "capi"))' 2>/dev/null); then
      PY_VERSION=$(sed -n 1p <<<"$PY_INFO")
      PY_CAPI=$(sed -n 2p <<<"$PY_INFO")
      [[ $PY_VERSION == "$ORT_VERSION" ]] || die "Python onnxruntime is $PY_VERSION but onnxruntime-node is $ORT_VERSION: provider libraries only load into the same version (pip install onnxruntime-gpu==$ORT_VERSION from a local wheel)"
      have_providers "$PY_CAPI" || die "Python onnxruntime $PY_VERSION at $PY_CAPI has no CUDA provider (is it onnxruntime-gpu?)"
      SOURCE=$PY_CAPI
      say "taking the provider libraries from Python onnxruntime-gpu $PY_VERSION ($PY_CAPI)"
    fi
  fi
  [[ -n $SOURCE ]] || die "no CUDA provider: not in $BIN_DIR, ORT_CUDA_LIBS unset, and no Python onnxruntime-gpu $ORT_VERSION found"
  for lib in "${PROVIDER_LIBS[@]}"; do
    cp -f "$SOURCE/$lib" "$BIN_DIR/$lib"
  done
  say "copied ${PROVIDER_LIBS[*]} into $BIN_DIR"
fi

# CUDA runtime, cuBLAS, cuDNN: the system's, and pip's nvidia-* wheels (how onnxruntime-gpu finds them)
LIB_PATHS=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  if [[ -d $d ]]; then LIB_PATHS+=("$d"); fi
done
if [[ -n $PYTHON_BIN ]]; then
  while IFS= read -r d; do
    if [[ -n $d ]]; then LIB_PATHS+=("$d"); fi
  done < <("$PYTHON_BIN" -c 'import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(d)' 2>/dev/null || true)
fi
if ((${#LIB_PATHS[@]} > 0)); then
  JOINED=$(IFS=:; echo "${LIB_PATHS[*]}")
  export LD_LIBRARY_PATH="$JOINED${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "LD_LIBRARY_PATH += $JOINED"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/[gpu-check] GPU: /' || true
fi

# ── 2. probe ──────────────────────────────────────────────────────────────────────────────────
PROBE=$(node --import tsx -e "
import('./src/model/placement.ts').then(async ({ probeCuda }) => {
  const r = await probeCuda();
  console.log(r.ok ? 'ok' : 'failed: ' + r.reason);
});" 2>"$OUT/probe.stderr" || true)
if [[ $PROBE != ok ]]; then
  say "the CUDA provider does not load: ${PROBE:-no answer}"
  # onnxruntime logs the dlopen error (the real reason) to stderr
  tail -n 5 "$OUT/probe.stderr" | sed 's/^/[gpu-check]   /' || true
  if command -v ldd >/dev/null; then
    say "missing dependencies of libonnxruntime_providers_cuda.so:"
    ldd "$BIN_DIR/libonnxruntime_providers_cuda.so" | grep 'not found' || say "(none reported by ldd)"
  fi
  die "CUDA probe"
fi
say "CUDA execution provider loads"

# ── 3. reference equality on CUDA ─────────────────────────────────────────────────────────────
if [[ ${SKIP_TESTS:-0} != 1 ]]; then
  # the defaults (RUNTIME=auto, KV=gqa): the C API runner, GroupQueryAttention's cache in CUDA
  # memory bound as both past and present, moved on the device
  say "reference-equality and device-KV tests on cuda (RUNTIME=auto, KV=gqa; fp32 and fp16)"
  if ! LORASERVE_TEST_DEVICE=cuda LORASERVE_TEST_RUNTIME=auto LORASERVE_TEST_KV=gqa npx vitest run test/engine-device.test.ts test/engine-batching.test.ts test/engine-transfer.test.ts test/gqa-device-kv.test.ts test/capi-session.test.ts 2>&1 | tee "$OUT/tests.log"; then
    die "tests on cuda (log: $OUT/tests.log)"
  fi
  say "the same engine tests through onnxruntime-node (RUNTIME=node, host KV buffers)"
  if ! LORASERVE_TEST_DEVICE=cuda LORASERVE_TEST_RUNTIME=node npx vitest run test/engine-device.test.ts test/engine-batching.test.ts 2>&1 | tee "$OUT/tests-node.log"; then
    die "onnxruntime-node tests on cuda (log: $OUT/tests-node.log)"
  fi
fi

# ── 4. bench on CUDA ──────────────────────────────────────────────────────────────────────────
if [[ ${SKIP_BENCH:-0} != 1 ]]; then
  say "bench: qwen2.5-0.5b preset on cuda (DTYPE=${DTYPE:-auto})"
  BENCH_JSON=$OUT/bench-qwen2.5-0.5b-cuda.json
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  DEVICE=cuda DTYPE=${DTYPE:-auto} npm run --silent bench -- --preset qwen2.5-0.5b --json ${BENCH_ARGS:-} >"$BENCH_JSON" 2> >(tee "$OUT/bench.stderr" >&2) ||
    die "bench (stderr: $OUT/bench.stderr)"
  node -e "
const r = JSON.parse(require('fs').readFileSync(process.argv[1], 'utf8'));
const f = (x, d = 1) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(d) : String(x));
console.log('[gpu-check] placement: ' + r.placement.provider + ' / ' + r.placement.dtype + ' (' + r.placement.reason + ')');
console.log('[gpu-check] tokens/s, decode: raw b1 ' + f(r.raw.b1.decodeTokPerS) + ', raw b8 ' + f(r.raw.b8.decodeTokPerS) + ', engine b1 ' + f(r.engine.b1.decodeTokPerS) + ', engine b8 ' + f(r.engine.b8.decodeTokPerS));
for (const p of r.context.points) console.log('[gpu-check] context ' + p.context + ': step ' + f(p.stepMs, 2) + ' ms, ' + f(p.bytesPerStep.toRuntime, 0) + ' B to / ' + f(p.bytesPerStep.fromRuntime, 0) + ' B from the runtime per step');
console.log('[gpu-check] step-time ratio (longest ÷ shortest context, batch ' + r.context.batch + '): ' + f(r.context.ratio, 2) + 'x');
" "$BENCH_JSON"
  say "bench JSON: $BENCH_JSON (put the numbers in bench/RESULTS.md)"
fi
say "done"
