#!/bin/sh
# tests/check-soak.sh: the soak's short version (kvrt-perf soak --quick:
# 20,000 request cycles through the C API with hits, aborts, preemptions,
# CPU/disk/Redis tier movements and every loaded token checked), then 3,000
# cycles under ASan + UBSan, whose LeakSanitizer fails the run on any leak
# at exit. Asserts what a user would see go wrong: wrong KV loaded, pins or
# pool slabs left after the drain, blocks never given back, descriptors
# that grow (none more at the end than after warm-up); RSS within 25% after warm-up here (the full run, 1M cycles in
# `ninja perf`, is held to 5% in perf/RESULTS.md).
set -u
cd "$(dirname "$0")/.."
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
ninja build/plain/kvrt-perf >/dev/null 2>&1 || { echo "FAIL: ninja"; exit 1; }
command -v redis-server >/dev/null || { echo "FAIL: redis-server missing (./configure installs it)"; exit 1; }
if ! build/plain/kvrt-perf soak --quick --json "$T/out.json" >"$T/out.txt" 2>&1; then
	tail -n 40 "$T/out.txt"; echo "FAIL: kvrt-perf soak exited non-zero"; exit 1
fi
cat "$T/out.txt"
python3 - "$T/out.json" <<'PY' || exit 1
import json, sys
s = json.load(open(sys.argv[1]))["suites"]["soak"]
f = {x["name"]: x["value"] for x in s["figures"]}
want_zero = ["wrong tokens loaded", "pins after the drain", "pool slabs not held by CPU-tier chunks",
             "requests still holding blocks"]
want_some = ["loaded tokens checked", "aborted while waiting", "preempted", "evicted from the CPU tier",
             "demoted to disk", "promoted from disk", "Redis writes", "Redis hits"]
bad = [f"{k} = {f.get(k)}" for k in want_zero if f.get(k) != 0]
bad += [f"{k} = {f.get(k)}: the soak lost its point" for k in want_some if not f.get(k)]
if f.get("request cycles", 0) < 20000:
    bad.append(f"only {f.get('request cycles')} cycles")
# a disk read in flight at warm-up may hold one more; the end is idle
if f.get("file descriptors at the end", 1e9) > f.get("file descriptors after warm-up", -1):
    bad.append("file descriptors grew: %s -> %s" % (f.get("file descriptors after warm-up"),
                                                    f.get("file descriptors at the end")))
if not 0 <= f.get("RSS growth after warm-up", -1) <= 25:
    bad.append(f"RSS grew {f.get('RSS growth after warm-up')}% after warm-up")
for b in bad:
    print("FAIL:", b)
sys.exit(1 if bad else 0)
PY
if [ -x build/asan/kvrt-perf ]; then
	if ! build/asan/kvrt-perf soak --opt cycles=3000 >"$T/asan.txt" 2>&1; then
		tail -n 60 "$T/asan.txt"; echo "FAIL: the soak under ASan + UBSan (leak or error above)"; exit 1
	fi
	grep -q "wrong tokens loaded *0 tokens" "$T/asan.txt" || { cat "$T/asan.txt"; echo "FAIL: asan soak"; exit 1; }
	echo "asan soak: 3000 cycles, no leak, no error"
else
	echo "FAIL: build/asan/kvrt-perf missing (ninja test builds it)"; exit 1
fi
echo "ok"
