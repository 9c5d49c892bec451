#!/usr/bin/env bash
# Compile-check every workers/*.cu with nvcc for sm_80 and sm_90, with the -D options the launcher passes.
# Exits non-zero on any compile error; exits 0 with a message when nvcc is not installed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found, skipping the CUDA compile check"
    exit 0
fi
# The launcher's options (cntk_gram.workers.gpu.compile_options): C++17 plus its -D flags; the file-level defaults agree.
python="${PYTHON:-python3}"
option_line="$(cd "$repo" && "$python" -c 'from cntk_gram.workers.gpu import compile_options; print(" ".join(compile_options()))')"
read -r -a options <<< "$option_line"
if [ "${#options[@]}" -eq 0 ]; then
    echo "check_cuda: could not read the launcher's compile options from cntk_gram.workers.gpu"
    exit 1
fi
status=0
for source in "$repo"/workers/*.cu; do
    for arch in sm_80 sm_90; do
        if nvcc "${options[@]}" -arch="$arch" --cubin -o /dev/null "$source"; then
            echo "check_cuda: ok   $(basename "$source") $arch"
        else
            echo "check_cuda: FAIL $(basename "$source") $arch"
            status=1
        fi
    done
done
exit $status
