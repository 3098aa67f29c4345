#!/usr/bin/env bash
# The GPU issue in one call on the GPU machine: build llamagen for CUDA (sm_90), print what the
# build reports, write synthetic Llama-3.2-1B / Llama-3.1-8B shaped models, quantize them with
# llamagen.quantize, benchmark llamagen against llama-bench, llama-batched-bench and llama-server
# built from the same source, then run the test suite in the time left.  Everything lands under $OUT:
#
#   run.log  build.log  tools-build.log  pytest.log  results.json  RESULTS-gpu.md
#
#   bash bench/gpu/run.sh           # on the device: needs $OUT (see bench/gpu/README.md)
#   bash bench/gpu/run.sh --smoke   # anywhere, on CPU: the same flow on the tiny synthetic model
#                                   # with the existing CPU build (no CUDA build, no nvcc)
#
# Environment knobs: BUDGET_S (whole run, default 540 s: nothing new starts after it), JOBS
# (default: all cores), CUDA_ARCH (default 90), MODELS (default llama-3.2-1b,llama-3.1-8b),
# TESTS_RESERVE_S (budget kept for the tests after the benchmarks, default 100), TESTS_TIMEOUT
# (at most, default 300 s), SKIP_TESTS=1, SKIP_BENCH=1 (build + tests only), PYTHON (default
# python3), GPU_BENCH_WORK (models and scratch, default /tmp/llamagen-gpu).  Results are saved after every section, so a run cut
# short by the budget or a timeout still returns what it measured.
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
SMOKE=0
if [ "${1:-}" = "--smoke" ] || [ "${GPU_SMOKE:-0}" = "1" ]; then SMOKE=1; fi
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
DEADLINE=$((START + BUDGET_S))
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
if [ "$SMOKE" = 1 ]; then
    OUT=${OUT:-$ROOT/bench/out/gpu-smoke}
    WORK=${GPU_BENCH_WORK:-/tmp/llamagen-gpu-smoke}
    MODELS=${MODELS:-tiny}
    export LLAMAGEN_BUILD_LOCK=${LLAMAGEN_BUILD_LOCK:-/tmp/llamagen-build.lock}
else
    if [ -z "${OUT:-}" ]; then echo "run.sh: set OUT (the device tool sets it), or use --smoke"; exit 2; fi
    WORK=${GPU_BENCH_WORK:-/tmp/llamagen-gpu}
    MODELS=${MODELS:-llama-3.2-1b,llama-3.1-8b}
fi
export OUT GPU_BENCH_WORK=$WORK PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
rm -f "$WORK/steps.tsv"
(cd "$OUT" && rm -f run.log build.log tools-build.log pytest.log results.json RESULTS-gpu.md)
exec > >(tee -a "$OUT/run.log") 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
# at least $1 seconds, else what is left of the budget minus $2
budget() { local t=$(($(left) - $2)); echo $((t > $1 ? t : $1)); }
# step NAME CMD...: run, log the exit code and seconds to $WORK/steps.tsv (shown in RESULTS-gpu.md)
step() {
    local name=$1 t0 rc
    shift
    t0=$(date +%s)
    echo "=== [$(date +%T)] $name ($(left) s of the budget left)"
    "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$WORK/steps.tsv"
    echo "=== [$(date +%T)] $name: exit code $rc after $(($(date +%s) - t0)) s"
    return $rc
}
report() {
    "$PY" bench/gpu/gpu_bench.py report --work "$WORK" --out "$OUT" --pytest-log "$OUT/pytest.log" \
        --pytest-rc "${TEST_RC:--1}" --pytest-command "${TEST_CMD:-not run}" >/dev/null
}
finish() {
    report
    echo "=== RESULTS-gpu.md"
    cat "$OUT/RESULTS-gpu.md" 2>/dev/null
    echo "=== $OUT"
    ls -la "$OUT"
    echo "=== total $(($(date +%s) - START)) s"
    exit "${1:-0}"
}

echo "=== llamagen GPU run: smoke=$SMOKE models=$MODELS jobs=$JOBS budget=${BUDGET_S}s out=$OUT work=$WORK"
uname -a
nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
"$PY" --version
df -h "$WORK" | tail -1

# -- 1. what the device lacks: carried wheels and the llama.cpp source ---------------------------
if [ "$SMOKE" = 0 ]; then
    if ls .gpucarry/wheels/*.whl >/dev/null 2>&1; then
        step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpucarry/wheels/*.whl || finish 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ ! -f third_party/llama.cpp/.llamagen-pin ]; then
        if [ ! -f .gpucarry/llama.cpp.tar.gz ]; then
            echo "no third_party/llama.cpp and no .gpucarry/llama.cpp.tar.gz: run bench/gpu/prepare_carry.sh"
            echo "here and carry .gpucarry"
            finish 1
        fi
        step unpack "$PY" -c "import tarfile; t = tarfile.open('.gpucarry/llama.cpp.tar.gz'); \
t.extractall('third_party', **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))" || finish 1
    fi
    # the CUDA toolkit: nvcc, cuBLAS and libcuda for CMake (cuBLAS may live in pip wheels), and
    # their library folders for the extension and the tools (bench/gpu/cuda_env.py says what it found)
    export TORCH_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
    CUDA_ENV=$("$PY" bench/gpu/cuda_env.py) || { echo "$CUDA_ENV"; finish 1; }
    echo "$CUDA_ENV"
    eval "$CUDA_ENV"
    "$CUDACXX" --version | tail -2
fi
"$PY" -c "import Cython, numpy, gguf; print('Cython', Cython.__version__, 'numpy', numpy.__version__, 'gguf ok')" \
    || finish 1
"$PY" -c "import os, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); \
print(h, 'found' if os.path.exists(h) else 'MISSING: the extension cannot be built')"

# -- 2. synthetic F16 models, written in the background while the extension builds ---------------
SKIP_BENCH=${SKIP_BENCH:-0}
if [ "$SKIP_BENCH" != 1 ]; then
    "$PY" bench/gpu/gpu_bench.py synth --work "$WORK" --models "$MODELS" >"$WORK/synth.log" 2>&1 &
    SYNTH_PID=$!
fi

# -- 3. build llamagen ---------------------------------------------------------------------------
if [ "$SMOKE" = 0 ]; then
    export LLAMAGEN_BACKEND=cuda LLAMAGEN_JOBS=$JOBS
    export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90}${CMAKE_ARGS:+ $CMAKE_ARGS}"
    echo "LLAMAGEN_BACKEND=$LLAMAGEN_BACKEND CMAKE_ARGS=$CMAKE_ARGS LLAMAGEN_JOBS=$JOBS ccache=$(command -v ccache || echo none)"
    step build timeout "$(budget 120 120)" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
    BUILD_RC=$?
    tail -5 "$OUT/build.log"
    if [ $BUILD_RC != 0 ]; then
        echo "=== build failed; the end of build.log:"
        grep -n -m 20 -i "error" "$OUT/build.log"
        tail -40 "$OUT/build.log"
        [ -n "${SYNTH_PID:-}" ] && kill "$SYNTH_PID" 2>/dev/null
        finish 1
    fi
fi

# -- 4. what the build reports -------------------------------------------------------------------
step info "$PY" -c "
import json, llamagen
print(json.dumps({'build_info': llamagen.build_info(),
                  'devices': [d._asdict() for d in llamagen.backend_devices()]}, indent=1))
print(llamagen.system_info())" || finish 1

# -- 5. Q4_K_M models (llamagen.quantize) while llama-bench / llama-batched-bench build ------------
if [ "$SKIP_BENCH" != 1 ]; then
    step synth wait "$SYNTH_PID"
    cat "$WORK/synth.log"
    step prepare timeout "$(budget 60 0)" "$PY" bench/gpu/gpu_bench.py prepare --work "$WORK" \
        --out "$OUT" --models "$MODELS" --jobs "$JOBS" --quant-threads "$JOBS"
fi

# -- 6. benchmarks first (what needs the GPU); the tests get the rest of the budget -------------
BENCH_ARGS=""
if [ "$SMOKE" = 1 ]; then BENCH_ARGS="--smoke --npls 1,4 --reps 2 --serve-streams 1,4 --serve-tokens 16"; fi
if [ "$SKIP_BENCH" != 1 ]; then
    # shellcheck disable=SC2086
    step bench timeout "$(budget 60 -60)" "$PY" bench/gpu/gpu_bench.py bench --work "$WORK" \
        --out "$OUT" --models "$MODELS" --deadline "$((DEADLINE - ${TESTS_RESERVE_S:-100}))" $BENCH_ARGS
fi

# -- 7. the test suite ---------------------------------------------------------------------------
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    if [ "$SMOKE" = 1 ]; then
        TEST_ARGS="tests/test_build.py tests/test_quantize.py tests/test_gpu_bench.py"
    else
        # the whole suite less what needs a package this image lacks (the test-only API clients,
        # the model packages: too large to carry); gpu_bench.py prints what it leaves out and why
        TEST_ARGS=$("$PY" bench/gpu/gpu_bench.py test-args) || TEST_ARGS="tests"
    fi
    T=${TESTS_TIMEOUT:-300}
    if [ "$T" -gt $(($(left) - 10)) ]; then T=$(($(left) - 10)); fi
    if [ "$T" -lt 60 ]; then T=60; fi
    TEST_CMD="pytest -q $TEST_ARGS (timeout ${T}s)"
    eval "step tests timeout $T \"$PY\" -m pytest -q -p no:cacheprovider --maxfail=10 \
        -o faulthandler_timeout=120 --durations=10 $TEST_ARGS" >"$OUT/pytest.log" 2>&1
    TEST_RC=$?
    tail -25 "$OUT/pytest.log"
fi

finish 0
