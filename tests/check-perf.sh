#!/bin/sh
# tests/check-perf.sh: kvrt's main job, kvrt-perf, end to end in --quick
# form on one preset: the suites exit 0 and write JSON whose figures are
# finite numbers with their limits; the e2e replays all ran (a hit rate
# above zero where prompts repeat, the serving workloads' per-step CPU);
# then perf/kvrt-plot draws its charts from that JSON (with .venv's
# matplotlib; skipped without it). Figures are not judged here: benchmarks
# report in perf/, they do not fail tests.
set -u
cd "$(dirname "$0")/.."
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
ninja build/plain/kvrt-perf >/dev/null 2>&1 || { echo "FAIL: ninja"; exit 1; }
if ! build/plain/kvrt-perf ring store kernels pipeline e2e --quick --opt presets=llama8b \
	--json "$T/out.json" >"$T/out.txt" 2>&1; then
	tail -n 40 "$T/out.txt"
	echo "FAIL: kvrt-perf exited non-zero"
	exit 1
fi
python3 - "$T/out.json" <<'PY' || exit 1
import json, math, sys
res = json.load(open(sys.argv[1]))
suites = res["suites"]
bad = []
for name in ("ring", "store", "kernels", "pipeline", "e2e"):
    s = suites.get(name)
    if s is None or s["status"] != 0 or not s["figures"]:
        bad.append(f"suite {name}: {s and s['status']}, {s and len(s['figures'])} figures")
        continue
    for f in s["figures"]:
        v = f["value"]
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            bad.append(f"{name}: {f['name']} = {v!r}")
        if f.get("limit") is not None and f.get("ratio") is None:
            bad.append(f"{name}: {f['name']} has a limit but no ratio")
e2e = {f["name"]: f["value"] for f in suites.get("e2e", {}).get("figures", [])}
for want in ("llama8b mrqa: hit rate", "llama8b ldqa: hit rate",
             "llama8b decode64: caller CPU/step p50, 64 running",
             "llama8b serve64: caller CPU/step mean, 64 running, continuous batching",
             "llama8b batch64: caller CPU/step p50, 64 new requests",
             "llama8b noreuse: connector wall/step (mean)"):
    if want not in e2e:
        bad.append(f"e2e: no figure '{want}'")
for wl in ("mrqa", "ldqa"):
    if e2e.get(f"llama8b {wl}: hit rate", 0) <= 0:
        bad.append(f"e2e: {wl} hit nothing")
if e2e.get("llama8b noreuse: hit rate", 1) != 0:
    bad.append("e2e: noreuse hit something")
notes = " ".join(suites.get("e2e", {}).get("notes", []))
if "could not run" in notes:
    bad.append("e2e: " + notes[notes.index("could not run") - 80:][:200])
for b in bad:
    print("FAIL:", b)
print(f"{sum(len(s['figures']) for s in suites.values())} figures from {len(suites)} suites")
sys.exit(1 if bad else 0)
PY
PY=${KVRT_PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=$(pwd)/.venv/bin/python
if [ -n "$PY" ] && "$PY" -c "import matplotlib" 2>/dev/null; then
	"$PY" perf/kvrt-plot "$T/out.json" --out "$T/plots" || { echo "FAIL: kvrt-plot"; exit 1; }
	for p in e2e-hit-rate e2e-step-cost bandwidth; do
		[ -s "$T/plots/$p.png" ] || { echo "FAIL: kvrt-plot drew no $p.png"; exit 1; }
	done
	echo "plots: $(ls "$T/plots" | tr '\n' ' ')"
else
	echo "kvrt-plot not checked: no python with matplotlib (./configure makes .venv)"
fi
echo "ok"
