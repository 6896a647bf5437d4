#!/bin/sh
# tests/check-trace.sh: the tracer end to end, on the real actor runtime.
#
# Runs build/plain/tests/trace_demo (two actors, two producers, calls):
#   1. with KVRT_TRACE=<file>: the file must be a trace Perfetto can show
#      (tests/trace_check.py: slices per handled message on both actors,
#      mailbox counters, paired flow arrows, thread names) and perf/kvrt-trace
#      must summarise it with the same counts;
#   2. without KVRT_TRACE (unset, and empty): nothing may be written;
#   3. with a tiny KVRT_TRACE_BUFFER: the trace stays valid and says how many
#      records were dropped, and the program still succeeds;
#   4. with an unwritable path: one error naming the path, exit status 0.
# Run from the repository root by tests/run.sh. Exit 0 pass, 1 fail, 77 skip.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
demo=$top/build/plain/tests/trace_demo
tool=$top/perf/kvrt-trace

command -v python3 >/dev/null 2>&1 || { echo "skip: python3 not found"; exit 77; }
if [ ! -x "$demo" ]; then
	echo "FAIL: $demo not built (ninja build/plain/trace-tools)"
	exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvrt-check-trace.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT INT TERM
fail=0
bad() { echo "FAIL: $*"; fail=1; }

# 1. Traced run.
trace=$tmp/trace.json
if out=$(KVRT_TRACE=$trace "$demo" 3000 2>"$tmp/err1"); then
	echo "demo: $out"
	alpha=$(echo "$out" | sed -n 's/.*alpha=\([0-9]*\).*/\1/p')
	beta=$(echo "$out" | sed -n 's/.*beta=\([0-9]*\).*/\1/p')
	if [ -z "$alpha" ] || [ -z "$beta" ]; then
		bad "demo printed no counts: $out"
	elif [ ! -f "$trace" ]; then
		bad "KVRT_TRACE=$trace: no file written"
	else
		[ -e "$trace.tmp" ] && bad "$trace.tmp left behind"
		python3 tests/trace_check.py "$trace" --actor "alpha=$alpha" --actor "beta=$beta" \
			--kvrt-trace "$tool" || bad "trace_check.py"
		"$tool" "$trace" || bad "kvrt-trace $trace"
	fi
else
	bad "traced demo failed: $(cat "$tmp/err1")"
fi

# 2. Off by default: nothing written, in the working directory or elsewhere.
mkdir "$tmp/off" && cd "$tmp/off" || exit 1
(unset KVRT_TRACE; "$demo" 500 >/dev/null 2>"$tmp/err2") || bad "untraced demo failed: $(cat "$tmp/err2")"
KVRT_TRACE= "$demo" 500 >/dev/null 2>>"$tmp/err2" || bad "demo with KVRT_TRACE= failed"
[ -z "$(ls -A .)" ] && echo "off: no file written" || bad "files written without KVRT_TRACE: $(ls -A .)"
[ -s "$tmp/err2" ] && bad "untraced demo printed: $(cat "$tmp/err2")"
cd "$top" || exit 1

# 3. Tiny buffers: records dropped, counted, reported; the file still valid.
small=$tmp/small.json
KVRT_TRACE=$small KVRT_TRACE_BUFFER=200 "$demo" 2000 >/dev/null 2>"$tmp/err3" ||
	bad "demo with a tiny buffer failed: $(cat "$tmp/err3")"
grep -q "records dropped" "$tmp/err3" || bad "no warning about dropped records at stop"
python3 - "$small" <<'EOF' || bad "tiny-buffer trace"
import json, sys
doc = json.load(open(sys.argv[1]))
n = doc["otherData"]["dropped_records"]
per = sum(e["args"]["dropped"] for e in doc["traceEvents"]
          if e.get("ph") == "M" and e.get("name") == "kvrt_dropped_records")
assert n > 0, "nothing dropped with 200-record buffers"
assert per == n, f"per-thread drops {per} != total {n}"
print(f"tiny buffer: {n} records dropped, reported")
EOF
"$tool" "$small" | grep -q "records dropped" || bad "kvrt-trace does not report the drops"

# 4. Unwritable path: one clear error, no crash, the program's result intact.
nowhere=$tmp/missing-dir/trace.json
KVRT_TRACE=$nowhere "$demo" 500 >/dev/null 2>"$tmp/err4" || bad "demo failed when the trace could not be written"
grep -q "cannot write $nowhere: No such file or directory" "$tmp/err4" ||
	bad "no error naming the path: $(cat "$tmp/err4")"
[ "$(grep -c 'kvrt: error' "$tmp/err4")" -eq 1 ] || bad "want exactly one error: $(cat "$tmp/err4")"

# kvrt-trace on bad input: exit 2, a message, no traceback.
"$tool" "$tmp/nope.json" >/dev/null 2>"$tmp/err5"
[ $? -eq 2 ] || bad "kvrt-trace on a missing file: want exit 2"
printf '{"traceEvents": [' >"$tmp/broken.json"
"$tool" "$tmp/broken.json" >/dev/null 2>>"$tmp/err5"
[ $? -eq 2 ] || bad "kvrt-trace on broken JSON: want exit 2"
grep -q Traceback "$tmp/err5" && bad "kvrt-trace printed a traceback"

[ $fail -eq 0 ] && echo "check-trace: ok"
exit $fail
