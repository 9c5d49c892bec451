#!/usr/bin/env bash
# CUDA guards (no GPU needed):
#  1. every workers/*.cu compiles with nvcc for sm_80 and sm_90 with the launcher's options;
#  2. the tile kernels (cntk_gap_tile, cntk_vanilla_tile) use no local memory for sm_90: ptxas -v must report
#     0 bytes stack frame and 0 bytes spill stores/loads;
#  3. the SASS instruction count per entry-layer (benchmarks/bench_gpu.py --check-sass, cuobjdump + nvdisasm)
#     agrees with INSTR_PER_ENTRY_LAYER in cntk_gram.workers.gpu, which the FP32 fractions are computed from, and
#     the LAP builds' GAP kernel with LAP_INSTR_PER_ENTRY_LAYER; the LAP builds (LAP_COUNT 1, 3, 8) compile and
#     their GAP kernel uses no local memory on sm_90 either.
# Exits non-zero on any failure; exits 0 with a message when nvcc is not installed, and skips guard 3 with a
# message when cuobjdump is missing (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm provides both).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found, skipping the CUDA checks"
    exit 0
fi
python="${PYTHON:-python3}"
option_line="$(cd "$repo" && "$python" -P -c 'from cntk_gram.workers.gpu import compile_options; print(" ".join(compile_options()))')"
# CHECK_CUDA_EXTRA: extra nvcc flags, appended (tests use it to show that the spill guard fails)
read -r -a options <<< "$option_line ${CHECK_CUDA_EXTRA:-}"
if [ "${#options[@]}" -eq 0 ]; then
    echo "check_cuda: could not read the launcher's compile options from cntk_gram.workers.gpu"
    exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for source in "$repo"/workers/*.cu; do
    for arch in sm_80 sm_90; do
        if nvcc "${options[@]}" -arch="$arch" --cubin -Xptxas -v -o /dev/null "$source" 2>"$tmp/ptxas.log"; then
            echo "check_cuda: ok   $(basename "$source") $arch"
        else
            cat "$tmp/ptxas.log"
            echo "check_cuda: FAIL $(basename "$source") $arch"
            status=1
            continue
        fi
        if [ "$(basename "$source")" = cntk_tile.cu ] && [ "$arch" = sm_90 ]; then
            # ptxas -v: "Compiling entry function 'NAME'" ... "N bytes stack frame, N bytes spill stores, N bytes spill loads"
            for kernel in cntk_gap_tile cntk_vanilla_tile; do
                usage="$(awk -v k="'$kernel'" '/Compiling entry function/ {on = (index($0, k) > 0)} on && /stack frame/ {print; exit}' "$tmp/ptxas.log")"
                if [ -z "$usage" ]; then
                    echo "check_cuda: FAIL $kernel: no ptxas resource report found"
                    status=1
                elif echo "$usage" | grep -Eq '(^|[^0-9])[1-9][0-9]* bytes (stack frame|spill stores|spill loads)'; then
                    echo "check_cuda: FAIL $kernel sm_90 uses local memory:$usage"
                    status=1
                else
                    echo "check_cuda: ok   $kernel sm_90 no spills, no stack frame"
                fi
            done
        fi
    done
done
# LAP builds (-DLAP_COUNT=k, cntk_gram.workers.gpu.module_options): the GAP kernel must stay free of local memory
# too, from one LAP size up to the most the kernel takes.
for lap_count in 1 3 8; do
    for arch in sm_80 sm_90; do
        if ! nvcc "${options[@]}" "-DLAP_COUNT=$lap_count" -arch="$arch" --cubin -Xptxas -v -o /dev/null \
                "$repo/workers/cntk_tile.cu" 2>"$tmp/ptxas.log"; then
            cat "$tmp/ptxas.log"
            echo "check_cuda: FAIL cntk_tile.cu LAP_COUNT=$lap_count $arch"
            status=1
            continue
        fi
        [ "$arch" = sm_90 ] || continue
        usage="$(awk -v k="'cntk_gap_tile'" '/Compiling entry function/ {on = (index($0, k) > 0)} on && /stack frame/ {print; exit}' "$tmp/ptxas.log")"
        if [ -z "$usage" ] || echo "$usage" | grep -Eq '(^|[^0-9])[1-9][0-9]* bytes (stack frame|spill stores|spill loads)'; then
            echo "check_cuda: FAIL cntk_gap_tile LAP_COUNT=$lap_count sm_90 uses local memory (or no report):$usage"
            status=1
        else
            echo "check_cuda: ok   cntk_gap_tile LAP_COUNT=$lap_count sm_90 no spills, no stack frame"
        fi
    done
done
set +e
(cd "$repo" && "$python" -P benchmarks/bench_gpu.py --check-sass)
sass=$?
set -e
if [ "$sass" -eq 3 ]; then
    echo "check_cuda: skipping the SASS count check (cuobjdump/nvdisasm missing)"
elif [ "$sass" -ne 0 ]; then
    echo "check_cuda: FAIL the SASS count per entry-layer disagrees with INSTR_PER_ENTRY_LAYER"
    status=1
fi
exit $status
