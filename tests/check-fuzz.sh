#!/bin/sh
# tests/check-fuzz.sh: every libFuzzer target (tests/fuzz, build/fuzz) for a
# short while under ASan + UBSan: seeds from a real run (make_seeds), then
# KVRT_FUZZ_SECONDS (default 20) of mutation each. A crash, a leak, an UB
# report or an input slower than 10 s fails it; the input is kept under
# build/test-logs/fuzz/. `ninja fuzz` runs them long (tests/fuzz/run.sh).
# Exit 0 pass, 1 fail, 77 skip (targets not built: no clang).
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
bin=build/fuzz/fuzz
[ -x "$bin/make_seeds" ] || { echo "skip: fuzz targets not built (clang with libFuzzer: ./configure)"; exit 77; }
secs=${KVRT_FUZZ_SECONDS:-20}
out=build/test-logs/fuzz
rm -rf "$out"
mkdir -p "$out"
corpus=$(mktemp -d /tmp/kvrt-fuzz-XXXXXX) || exit 1
trap 'rm -rf "$corpus"' EXIT INT TERM
KVRT_LOG=error "$bin/make_seeds" "$corpus" >"$out/make_seeds.log" 2>&1 || {
	echo "FAIL make_seeds"; cat "$out/make_seeds.log"; exit 1; }
rc=0
for t in meta frame lsock config chunk disk redis; do
	mkdir -p "$corpus/$t"
	if KVRT_LOG=error "$bin/fuzz_$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$out/$t-" "$corpus/$t" >"$out/$t.log" 2>&1; then
		runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$t.log")
		echo "fuzz_$t: $runs runs in $secs s, no crash"
	else
		echo "FAIL fuzz_$t (log: $out/$t.log)"
		grep -E "ERROR|SUMMARY|runtime error" "$out/$t.log" | head -n 5
		rc=1
	fi
done
exit $rc
