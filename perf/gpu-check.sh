#!/bin/sh
# perf/gpu-check.sh: kvrt's check on a machine with one GPU (written for an
# H200 with CUDA 13 and PyTorch, no network, no package registry).
#
#   sh perf/gpu-check.sh          (from anywhere; logs under $OUT when set,
#                                  else build/gpu-check/)
#
# 1. Unpacks the Debian dependencies carried in .debs/ (see
#    ../shared/device/pack-debs.sh) under /tmp/deps, never into /.
# 2. Configures for sm_90 only (--cuda-arch=90 --no-install --no-test-deps)
#    and builds the kernels' GPU programs (tests/gpu/) and the library.
# 3. Runs every tests/gpu/test_* program: CUDA output against the host
#    reference, byte for byte (exit 0 pass, 1 fail, 77 skip).
# 4. Measures gather/scatter GB/s at Llama-3.1-8B shapes against the pinned
#    cudaMemcpyAsync peaks of the same run (tests/gpu/bench_gpu_copy).
# 5. Runs the e2e replay's GPU part (perf/gpu_e2e.py, torch CUDA tensors
#    through the shim's C API: save a long document, load it layer by layer
#    under a simulated attention kernel, load stall vs copy time, every load
#    byte-exact).
# 6. Prints a table last. Exit 0 when every GPU test passed and the
#    benchmark's round trip and every e2e load were byte-exact (speed
#    targets report PASS/MISS).
#
# Budget: under 5 minutes (each step has a timeout; the e2e part needs
# about 20 GB of GPU memory and half a minute).
#
# Oddities of such machines, handled here:
# - No Criterion or redis-server there: ./configure --no-test-deps skips
#   what only the unit tests need (this check builds none of those).
# - ninja may only exist as PyTorch's pip package: its BIN_DIR is used.
set -u

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
out=${OUT:-$top/build/gpu-check}
mkdir -p "$out"
summary="$out/gpu-check.log"
: >"$summary"
t_start=$(date +%s)

say() { printf '%s\n' "$*" | tee -a "$summary"; }
elapsed() { echo $(($(date +%s) - t_start)); }
die() {
	say "gpu-check: FAILED: $* ($(elapsed) s)"
	exit 1
}

# --- 1. dependencies ---------------------------------------------------------
# Same logic as ../shared/device/unpack-debs.sh, for a .debs/ without it.
unpack_debs() { # dir
	mkdir -p /tmp/deps
	for f in "$1"/*.deb; do
		[ -f "$f" ] || continue
		dpkg -x "$f" /tmp/deps || return 1
	done
	cat >/tmp/deps/env.sh <<'ENV'
export CPATH=/tmp/deps/usr/include${CPATH:+:$CPATH}
export LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PKG_CONFIG_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export KVRT_DEPS_PREFIX=/tmp/deps/usr
ENV
}

if [ -d .debs ]; then
	if [ -f .debs/unpack-debs.sh ]; then
		sh .debs/unpack-debs.sh >>"$summary" 2>&1 || die "unpacking .debs"
	else
		unpack_debs .debs >>"$summary" 2>&1 || die "unpacking .debs"
	fi
	# shellcheck disable=SC1091
	. /tmp/deps/env.sh
	say "deps: unpacked .debs under /tmp/deps"
fi

if ! command -v ninja >/dev/null 2>&1; then
	nbin=$(python3 -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null || true)
	[ -n "$nbin" ] && [ -x "$nbin/ninja" ] && PATH="$nbin:$PATH" && export PATH
fi
command -v ninja >/dev/null 2>&1 || die "no ninja on this machine"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
	PATH="/usr/local/cuda/bin:$PATH"
	export PATH
fi

(nvidia-smi || echo "nvidia-smi failed") >"$out/nvidia-smi.txt" 2>&1
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
say "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"

# --- 2. configure and build ------------------------------------------------------
if ! timeout 120 ./configure --cuda-arch=90 --no-install --no-test-deps >"$out/configure.log" 2>&1; then
	cat "$out/configure.log" >>"$summary"
	die "./configure"
fi
grep -q '^cu_rule = nvcc' build/config.ninja || die "configure did not enable CUDA (see configure.log)"
say "configure: ok ($(elapsed) s)"

jobs=$(nproc 2>/dev/null || echo 8)
if ! timeout 240 ninja -j "$jobs" build/plain/kernels-tools build/plain/libkvrt.so.0.1.0 >"$out/build.log" 2>&1; then
	tail -n 40 "$out/build.log" >>"$summary"
	die "build (see build.log)"
fi
say "build: ok ($(elapsed) s)"

# --- 3. GPU tests ------------------------------------------------------------------
tests_ok=1
results=""
for t in build/plain/tests/gpu/test_*; do
	case $t in *.o | *.d) continue ;; esac
	[ -x "$t" ] || continue
	name=$(basename "$t")
	timeout 120 "$t" >"$out/$name.log" 2>&1
	rc=$?
	case $rc in
	0) verdict=pass ;;
	77) verdict="SKIP (no GPU seen)"; tests_ok=0 ;;
	124) verdict="FAIL (timeout)"; tests_ok=0 ;;
	*) verdict="FAIL (exit $rc)"; tests_ok=0 ;;
	esac
	results="$results
  $name: $verdict: $(tail -n 1 "$out/$name.log")"
	say "test $name: $verdict ($(elapsed) s)"
done
[ -n "$results" ] || { tests_ok=0; results="
  no tests/gpu programs were built"; }

# --- 4. benchmark ---------------------------------------------------------------------
bench=build/plain/tests/gpu/bench_gpu_copy
timeout 180 "$bench" >"$out/bench.log" 2>&1
brc=$?
say "bench: exit $brc ($(elapsed) s)"

# --- 5. e2e on CUDA tensors ---------------------------------------------------------------
py=${PYTHON:-python3}
OUT=$out KVRT_LIB=$top/build/plain/libkvrt.so timeout 180 "$py" perf/gpu_e2e.py >"$out/gpu_e2e.log" 2>&1
erc=$?
say "e2e: exit $erc ($(elapsed) s)"

# --- 6. table last -----------------------------------------------------------------------
{
	echo
	echo "== kvrt GPU check ($(elapsed) s) =="
	echo "GPU tests:$results"
	echo
	if [ -s "$out/bench.log" ]; then
		sed -n '/^device:/p; /^shape:/p' "$out/bench.log"
		sed -n '/^figure/,$p' "$out/bench.log"
	fi
	[ $brc -ne 0 ] && echo "bench_gpu_copy exited $brc (see bench.log)"
	echo
	sed -n '/^gpu_e2e:/,$p' "$out/gpu_e2e.log"
	[ $erc -ne 0 ] && { echo "gpu_e2e.py exited $erc (see gpu_e2e.log):"; tail -n 15 "$out/gpu_e2e.log"; }
} | tee -a "$summary"
[ $tests_ok -eq 1 ] && [ $brc -eq 0 ] && [ $erc -eq 0 ]
