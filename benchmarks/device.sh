#!/usr/bin/env bash
# The standard batch of one call on the GPU machine: the CUDA tests of the Triton kernels, then
# the benchmarks. Each part's output goes to OUTDIR/<part>.txt, headed by the device, the date
# and the commit (with the number of uncommitted files).
#
#   bash benchmarks/device.sh [OUTDIR] [PARTS]
#   PARTS: tests,search,patches,attention,profile,patchprofile,stagedsweep,
#          scattertile,anchors,anchorparts,anchorflush,dpossweep,rowssweep,host,layoutcopy,
#          foldsweep
#
# TESTS_K, if set, selects tests (pytest -k): on a GPU every kernel variant the tests draw
# compiles on first use, up to a minute each for the search row kernels. The tests run in
# parallel (pytest-xdist, TEST_WORKERS processes, default 8) where it is installed, or where
# its wheels lie in .whl/ (the device machine has no package index: carry .whl there).
# The part "profile" runs Nsight Compute (clocks left alone) on the forward of each row in
# PROFILE_ROWS (default W3,W1s; "W3:bwd" for a backward): where the warps stall, issue slots,
# occupancy and the instruction mix; "patchprofile" the same, and the memory workload, for
# both knn rows' patch ops at the defaults and wpsum's flat modes (patches.py --rows profile).
# SEARCH_ROWS (default W3,W1s,W1,W4,W2) picks the rows of the part "search" and SEARCH_PARTS
# (default bwd; bwd,base,ref,det adds the plain-PyTorch loop, the reference path and the
# deterministic mode, search.py --parts) what it measures besides the forward; PATCH_ROWS
# (default fold,knn) those of "patches". The part "stagedsweep" times the staged gather/wpsum tiles
# against the direct kernels (patches.py --rows stagedsweep); "scattertile"
# scatter's tile kernel at its launches (--rows scattertile); "anchors" scatter by anchors
# (the entries grouped by position, each position's patches summed once) at its launches
# (--rows anchors),
# "anchorparts" its peak, host and per-kernel times alone (--rows anchorparts), "anchorflush"
# its sums added into the video with atomics against folded (--rows anchorflush); "rowssweep"
# wpsum in the staged kernel's rows modes against its earlier defaults (--rows rowssweep);
# "host" each knn op's event, kernel and host time per call, and a cProfile of its host path;
# "layoutcopy" the channels-last copies by the transpose kernel against PyTorch's copies;
# "foldsweep" ifold's kernel at its launches (rows, pixels and channels per program, warps);
# "dpossweep"
# gather's position gradient at its launches (--rows dpossweep).
# Before a device call, `search.py --smoke` and `patches.py --smoke` run the same code on the
# CPU (tiny sizes, the interpreter, nothing timed).
set -uo pipefail
out=${1:-${OUT:-/tmp/dnls-device}}
parts=${2:-tests,search,patches}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
# DNLS_COMMIT (set it in the device command) names the commit of a tree copied with a stale .git
commit="${DNLS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) ($(git status --short 2>/dev/null | wc -l) uncommitted)}"
export DNLS_COMMIT=${DNLS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
# TRITON_CACHE_DIR, if set, is printed with its count of compiled kernels before and after each
# part: a cache compiled by offline.py with the device's Triton and carried to the call saves
# the compiles it holds, and a count that does not grow shows that it did. Made here with
# `TRITON_CACHE_DIR=$PWD/.tcache python benchmarks/offline.py ROW --part bench` under the
# device's Triton (3.6) and Python (3.12): the cache key hashes libtriton.so, built per Python
# (offline.py's docstring); listed in .git/info/exclude and named in the call's carry.
cache_count() {
    if [ -n "${TRITON_CACHE_DIR:-}" ]; then
        echo "# triton cache $TRITON_CACHE_DIR: $1" \
            "$(find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l) cubins"
    fi
}
run() {
    local name=$1
    shift
    { echo "# $gpu, $(date -u +%FT%TZ), commit $commit: $*"; cache_count before; "$@"
      cache_count after; } 2>&1 \
        | grep --line-buffered -v Warning | tee "$out/$name.txt" | tail -25
}
workers=()
if ! python -c "import xdist" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
fi
if python -c "import xdist" 2>/dev/null; then
    workers=(-n "${TEST_WORKERS:-8}")
fi
for part in ${parts//,/ }; do
    case $part in
        tests) run tests python -m pytest -q -p no:cacheprovider "${workers[@]}" \
            ${TESTS_K:+-k "$TESTS_K"} \
            tests/test_search_triton.py tests/test_patches_triton.py tests/test_fold.py \
            tests/test_attention_triton.py ;;
        search) run search python benchmarks/search.py --rows "${SEARCH_ROWS:-W3,W1s,W1,W4,W2}" \
            --parts "${SEARCH_PARTS:-bwd}" ;;
        patches) run patches python benchmarks/patches.py --rows "${PATCH_ROWS:-fold,knn}" ;;
        foldsweep) run foldsweep python benchmarks/patches.py --rows foldsweep ;;
        stagedsweep) run stagedsweep python benchmarks/patches.py --rows stagedsweep ;;
        scattertile) run scattertile python benchmarks/patches.py --rows scattertile ;;
        anchors) run anchors python benchmarks/patches.py --rows anchors ;;
        anchorparts) run anchorparts python benchmarks/patches.py --rows anchorparts ;;
        host) run host python benchmarks/patches.py --rows host ;;
        layoutcopy) run layoutcopy python benchmarks/patches.py --rows layoutcopy ;;
        anchorflush) run anchorflush python benchmarks/patches.py --rows anchorflush ;;
        dpossweep) run dpossweep python benchmarks/patches.py --rows dpossweep ;;
        rowssweep) run rowssweep python benchmarks/patches.py --rows rowssweep ;;
        attention) run attention python benchmarks/attention.py ;;
        profile) run profile "$(command -v ncu || echo /usr/local/cuda/bin/ncu)" \
            --clock-control none --profile-from-start off --section SpeedOfLight \
            --section WarpStateStats --section SchedulerStats --section InstructionStats \
            --section Occupancy python benchmarks/search.py --profile "${PROFILE_ROWS:-W3,W1s}" ;;
        patchprofile) run patchprofile "$(command -v ncu || echo /usr/local/cuda/bin/ncu)" \
            --clock-control none --profile-from-start off --section SpeedOfLight \
            --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
            --section InstructionStats --section Occupancy \
            python benchmarks/patches.py --rows profile ;;
        *) echo "unknown part: $part (tests, search, patches, attention, profile, patchprofile,
           stagedsweep, scattertile, anchors, anchorparts,
           anchorflush, dpossweep, rowssweep, host, layoutcopy)" >&2
           exit 2 ;;
    esac
done
