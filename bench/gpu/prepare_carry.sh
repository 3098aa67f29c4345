#!/usr/bin/env bash
# Run HERE (where the package registry is reachable) before the GPU call: put what the device
# lacks into .gpucarry/ (git-ignored), then name `.gpucarry` in the device call's carry list.
#
#   .gpucarry/llama.cpp.tar.gz   the pinned, unpacked third_party/llama.cpp (with its pin marker,
#                                so setup.py builds it without downloading anything); ~10 MB
#   .gpucarry/wheels/*.whl       gguf (pure Python) and Cython for CPython 3.12 (the device's
#                                python3); the device has numpy, pytest, cmake and ninja
#
# Checks that everything that travels (tracked and untracked-not-ignored files plus .gpucarry)
# stays under the 64 MiB limit.
set -eu
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

"$PY" third_party/fetch_llama_cpp.py          # the pinned source, unpacked once (a no-op if present)
rm -rf .gpucarry
mkdir -p .gpucarry/wheels
tar czf .gpucarry/llama.cpp.tar.gz --exclude=.git -C third_party llama.cpp

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
GGUF_VERSION=$(version gguf 0.19.0)
CYTHON_VERSION=$(version Cython 3.3.1)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpucarry/wheels "gguf==$GGUF_VERSION" "Cython==$CYTHON_VERSION"

carry=$(du -sb .gpucarry | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
shared=0
if [ -d shared ]; then shared=$(du -sb shared | cut -f1); fi
total=$((carry + tree + shared))
ls -la .gpucarry .gpucarry/wheels
awk -v t="$tree" -v c="$carry" -v s="$shared" 'BEGIN { m = 1048576;
    printf "travels: working tree %.1f MiB + .gpucarry %.1f MiB + shared/ %.1f MiB = %.1f MiB (limit 64 MiB)\n",
           t / m, c / m, s / m, (t + c + s) / m }'
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "prepare_carry.sh: over 60 MiB: the device call would be refused" >&2
    exit 1
fi
