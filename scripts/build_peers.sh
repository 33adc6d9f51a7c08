#!/usr/bin/env bash
# Build llama.cpp's own quantiser (llama-quantize, llama-imatrix) for the bench-only peers
# step, from the llama.cpp source that the llama-cpp-python sdist vendors. CPU only, cached:
# a second run with the binaries present does nothing. Nothing in slc or its tests needs it;
# bench/peers.py does, and says "run `make peers`" when it is missing.
#
#   scripts/build_peers.sh [PEERS_DIR]        (default build/peers; `make peers` calls this)
#
# Environment: PYTHON (for `pip download`, default .venv/bin/python), LLAMA_CPP_PYTHON
# (the sdist version, default 0.3.36), JOBS (default 2), SDIST (a local copy of the sdist
# to use instead of downloading).
set -euo pipefail

PEERS_DIR=${1:-build/peers}
PYTHON=${PYTHON:-.venv/bin/python}
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
JOBS=${JOBS:-2}
SRC="$PEERS_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$PEERS_DIR/cmake"
BIN="$PEERS_DIR/bin"

if [[ -x "$BIN/llama-quantize" && -x "$BIN/llama-imatrix" && -f "$PEERS_DIR/SOURCE" ]] \
   && [[ "$(cat "$PEERS_DIR/SOURCE")" == "llama-cpp-python==$VERSION" ]]; then
    echo "peers: $BIN has llama-quantize and llama-imatrix (llama-cpp-python==$VERSION); nothing to do"
    exit 0
fi
mkdir -p "$PEERS_DIR"

# 1. The sdist (76 MB): pip's ordinary client, no binaries, no dependencies.
if [[ ! -d "$SRC" ]]; then
    tarball="$PEERS_DIR/llama_cpp_python-$VERSION.tar.gz"
    if [[ -n "${SDIST:-}" ]]; then
        cp "$SDIST" "$tarball"
    elif [[ ! -f "$tarball" ]]; then
        "$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps \
            -d "$PEERS_DIR" -q
    fi
    tar xzf "$tarball" -C "$PEERS_DIR"
fi
test -f "$SRC/CMakeLists.txt" || { echo "peers: no llama.cpp source at $SRC" >&2; exit 1; }

# 2. Configure: Release, tuned to this CPU, no network code, no server/tests/examples.
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
start=$(date +%s)
cmake -S "$SRC" -B "$BUILD" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >/dev/null

# 3. Only the two tools (and what they link).
cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-quantize llama-imatrix
mkdir -p "$BIN"
cp "$BUILD/bin/llama-quantize" "$BUILD/bin/llama-imatrix" "$BIN/"
echo "llama-cpp-python==$VERSION" > "$PEERS_DIR/SOURCE"
echo "peers: built $BIN/llama-quantize and $BIN/llama-imatrix in $(( $(date +%s) - start )) s"
