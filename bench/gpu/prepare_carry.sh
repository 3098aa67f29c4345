#!/usr/bin/env bash
# Run HERE (where the package registry is reachable) before the GPU call: put what the device
# lacks into .gpucarry/ (git-ignored), then name `.gpucarry` in the device call's carry list.
#
#   .gpucarry/llama.cpp.tar.gz   the pinned, unpacked third_party/llama.cpp (with its pin marker,
#                                so setup.py builds it without downloading anything); ~10 MB
#   .gpucarry/wheels/*.whl       for CPython 3.12 (the device's python3): gguf and Cython (the
#                                build), and what `llamagen serve` needs that the image lacks:
#                                fastapi, starlette, pydantic, pydantic-core, annotated-types,
#                                typing-inspection, uvicorn, opentelemetry-api (fastapi imports
#                                it), typing-extensions (pydantic's minimum).  The image has numpy,
#                                pytest, cmake, ninja, httpx, anyio, click, h11, annotated-doc and
#                                prometheus-client (checked with `pip download` of fastapi and
#                                uvicorn against the image's package list in the device notes)
#                                And the test suite's API clients (openai, anthropic, jsonschema,
#                                with what they need beyond the image), so the server tests run
#                                there too; schemathesis (the fuzz test) stays behind.
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
# the versions installed here (tested here), else these
PINS=""
for spec in gguf:0.19.0 Cython:3.3.1 fastapi:0.165.0 starlette:1.10.0 pydantic:2.13.4 \
            pydantic_core:2.46.4 annotated-types:0.7.0 typing-inspection:0.4.2 uvicorn:0.54.0 \
            opentelemetry-api:1.45.2 typing_extensions:4.15.0 \
            openai:3.57.0 anthropic:2.15.0 docstring-parser:0.18.0 httpx2:2.16.2 httpcore2:2.16.2 \
            truststore:0.10.5 jiter:0.19.0 sniffio:1.3.1 jsonschema:4.26.0 \
            jsonschema-specifications:2025.9.1 referencing:0.37.0 rpds-py:0.30.0; do
    PINS="$PINS ${spec%%:*}==$(version "${spec%%:*}" "${spec#*:}")"
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpucarry/wheels $PINS

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
