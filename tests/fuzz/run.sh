#!/bin/sh
# tests/fuzz/run.sh [RUNS]: `ninja fuzz`: every libFuzzer target for RUNS
# executions (default 10000000) from seeds of a real run, one after the
# other, and a table last (target, executions, seconds, result). Long:
# minutes to an hour on 2 cores (fuzz_config writes a file per input).
# The corpora grow under build/fuzz/corpus/ (kept between runs).
set -u
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top" || exit 1
runs=${1:-10000000}
bin=build/fuzz/fuzz
corpus=build/fuzz/corpus
mkdir -p "$corpus" build/fuzz/logs
KVRT_LOG=error "$bin/make_seeds" "$corpus" >/dev/null 2>&1 || { echo "make_seeds failed"; exit 1; }
table=""
rc=0
for t in meta frame lsock config chunk disk redis; do
	t0=$(date +%s)
	if KVRT_LOG=error "$bin/fuzz_$t" -runs="$runs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		-artifact_prefix="build/fuzz/logs/$t-" "$corpus/$t" >"build/fuzz/logs/$t.log" 2>&1; then
		res=ok
	else
		res="FAIL (build/fuzz/logs/$t.log)"
		rc=1
	fi
	n=$(sed -n 's/^stat::number_of_executed_units: *//p' "build/fuzz/logs/$t.log")
	table="$table$(printf '%-12s %12s %6s s  %s' "fuzz_$t" "${n:-?}" $(($(date +%s) - t0)) "$res")
"
	echo "fuzz_$t: ${n:-?} runs, $res"
done
printf '\n%-12s %12s %8s  %s\n%s' target executions time result "$table"
exit $rc
