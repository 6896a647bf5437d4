#!/usr/bin/env python3
"""tests/trace_check.py: validate a trace written by tests/trace_demo.

    trace_check.py TRACE [--actor NAME=HANDLED ...] [--kvrt-trace PATH]
                   [--allow-dropped]

Checks what Perfetto and chrome://tracing need and what a user looks for:
the file is JSON with a traceEvents array; every event has ph, ts, pid, tid;
X slices have dur >= 0; each actor has a named thread (thread_name metadata),
handled-message slices (exactly HANDLED when given: one per message), and
"<actor>.mailbox" counters; every flow arrow has one "s" and one "f" with the
same id, cat and name, the "s" inside a slice on the sending thread, the "f"
(bp "e") inside a slice on an actor's thread and not before its "s"; every
handled message's slice ends an arrow. With --kvrt-trace, the summary tool
must report each actor with the same message count and mailbox maximum.
Exit 0 pass, 1 fail (the reasons on stderr).
"""
import argparse
import bisect
import json
import subprocess
import sys

POST_CAT = "kvrt.post"
EPS = 1e-6  # us; timestamps have nanosecond digits


def isnum(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Checker:
    def __init__(self):
        self.errors = []

    def check(self, cond, msg):
        if not cond and len(self.errors) < 50:
            self.errors.append(msg)
        return cond


def within(slices, ts):
    """True when ts lies in one of slices (sorted (start, end) pairs)."""
    i = bisect.bisect_right(slices, (ts + EPS, float("inf")))
    # Slices on one thread may nest: look back over the nearest candidates.
    for j in range(i - 1, max(-1, i - 1 - 10000), -1):
        start, end = slices[j]
        if start <= ts + EPS and ts - EPS <= end:
            return True
    return False


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--actor", action="append", default=[], metavar="NAME=HANDLED")
    ap.add_argument("--kvrt-trace", dest="tool")
    ap.add_argument("--allow-dropped", action="store_true")
    a = ap.parse_args(argv)
    c = Checker()

    try:
        with open(a.trace, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        print(f"trace_check: {a.trace}: {e}", file=sys.stderr)
        return 1
    if not c.check(isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list),
                   "top level is not an object with a traceEvents array"):
        print("\n".join(c.errors), file=sys.stderr)
        return 1
    events = doc["traceEvents"]
    actors = {}
    for spec in a.actor:
        name, _, n = spec.partition("=")
        actors[name] = int(n) if n else None
    other = doc.get("otherData", {})
    dropped = other.get("dropped_records") if isinstance(other, dict) else None
    c.check(isnum(dropped), "otherData.dropped_records missing")
    if not a.allow_dropped:
        c.check(dropped == 0, f"{dropped} records dropped")

    names = {}       # (pid, tid) -> thread name
    slices = {}      # (pid, tid) -> [(start, end)] of every X
    handled = {}     # (pid, tid) -> [(start, end, dur)] of message slices
    counters = {}    # counter name -> [(value, (pid, tid))]
    starts, ends = {}, {}  # flow id -> [event]
    process_names = []
    for i, e in enumerate(events):
        if not c.check(isinstance(e, dict), f"event {i} is not an object"):
            continue
        for k in ("ph", "ts", "pid", "tid"):
            c.check(k in e, f"event {i} ({e.get('name')!r}) has no {k}")
        if not isnum(e.get("ts")):
            c.check(False, f"event {i} has a non-numeric ts")
            continue
        ph, key, ts = e.get("ph"), (e.get("pid"), e.get("tid")), e["ts"]
        if ph == "M":
            args = e.get("args", {})
            if e.get("name") == "thread_name":
                names[key] = args.get("name")
            elif e.get("name") == "process_name":
                process_names.append(args.get("name"))
        elif ph == "X":
            dur = e.get("dur")
            if not c.check(isnum(dur) and dur >= 0, f"X event {i} has dur {dur!r}"):
                continue
            slices.setdefault(key, []).append((ts, ts + dur))
            if e.get("cat") != POST_CAT:
                handled.setdefault(key, []).append((ts, ts + dur, dur))
        elif ph == "C":
            v = e.get("args", {}).get("value")
            c.check(isnum(v), f"counter event {i} has no numeric args.value")
            counters.setdefault(e.get("name"), []).append((v, key))
        elif ph in ("s", "f"):
            c.check("id" in e and "cat" in e and "name" in e,
                    f"flow event {i} lacks id, cat or name")
            (starts if ph == "s" else ends).setdefault(e.get("id"), []).append(e)
    for v in slices.values():
        v.sort()

    c.check(process_names == ["kvrt"], f"process_name metadata: {process_names}")
    by_name = {}
    for key, n in names.items():
        by_name.setdefault(n, []).append(key)
    actor_keys = {}
    for actor, want in actors.items():
        keys = by_name.get(actor, [])
        if not c.check(len(keys) == 1, f"thread_name {actor!r} named {len(keys)} threads"):
            continue
        key = actor_keys[actor] = keys[0]
        n = len(handled.get(key, []))
        c.check(n > 0, f"no message slices on actor {actor}'s thread")
        if want is not None:
            c.check(n == want, f"actor {actor}: {n} slices, but it handled {want} messages")
        samples = counters.get(f"{actor}.mailbox", [])
        c.check(samples, f"no {actor}.mailbox counter")
        c.check(all(k == key for _, k in samples),
                f"{actor}.mailbox sampled off the actor's thread")
        c.check(all(isnum(v) and v >= 0 for v, _ in samples), f"{actor}.mailbox < 0")

    # Flows: one start, one end, same cat and name; ends inside slices.
    actor_set = set(actor_keys.values())
    ends_on = {}
    for fid, evs in ends.items():
        if not c.check(len(evs) == 1, f"flow {fid}: {len(evs)} ends"):
            continue
        f = evs[0]
        s = starts.get(fid, [])
        if not c.check(len(s) == 1, f"flow {fid}: {len(s)} starts for one end"):
            continue
        s = s[0]
        c.check(f.get("bp") == "e", f"flow {fid}: end without bp=e")
        c.check((s.get("cat"), s.get("name")) == (f.get("cat"), f.get("name")),
                f"flow {fid}: start and end differ in cat/name")
        fkey, skey = (f["pid"], f["tid"]), (s["pid"], s["tid"])
        c.check(within(slices.get(fkey, []), f["ts"]),
                f"flow {fid}: end at {f['ts']} is in no slice of its thread")
        c.check(within(slices.get(skey, []), s["ts"]),
                f"flow {fid}: start at {s['ts']} is in no slice of its thread")
        c.check(s["ts"] <= f["ts"] + EPS, f"flow {fid}: ends before it starts")
        if actor_set:
            c.check(fkey in actor_set, f"flow {fid}: ends off the actors' threads")
        ends_on[fkey] = ends_on.get(fkey, 0) + 1
    for fid in starts:
        c.check(len(starts[fid]) == 1 and fid in ends, f"flow {fid}: start without one end")
    for actor, key in actor_keys.items():
        n = len(handled.get(key, []))
        c.check(ends_on.get(key, 0) == n,
                f"actor {actor}: {ends_on.get(key, 0)} arrows end in its {n} slices")

    # The summary tool agrees with the file.
    if a.tool:
        r = subprocess.run([a.tool, "--json", a.trace], capture_output=True, text=True)
        if c.check(r.returncode == 0, f"kvrt-trace --json failed: {r.stderr.strip()}"):
            summ = json.loads(r.stdout)
            rows = {row["name"]: row for row in summ["threads"]}
            c.check(summ.get("dropped_records") == dropped, "kvrt-trace: dropped count differs")
            for actor, key in actor_keys.items():
                row = rows.get(actor)
                if not c.check(row is not None, f"kvrt-trace: no row for {actor}"):
                    continue
                n = len(handled.get(key, []))
                c.check(row["messages"] == n,
                        f"kvrt-trace: {actor} has {row['messages']} messages, file {n}")
                mx = max((v for v, _ in counters.get(f"{actor}.mailbox", [])), default=None)
                c.check(row["mailbox_max"] == mx,
                        f"kvrt-trace: {actor} mailbox max {row['mailbox_max']}, file {mx}")
                c.check(0 <= row["busy_pct"] <= 100.0 + EPS, f"kvrt-trace: {actor} busy% out of range")
        r = subprocess.run([a.tool, a.trace], capture_output=True, text=True)
        if c.check(r.returncode == 0, f"kvrt-trace failed: {r.stderr.strip()}"):
            for actor in actor_keys:
                c.check(any(line.split()[:1] == [actor] for line in r.stdout.splitlines()),
                        f"kvrt-trace table has no row for {actor}")

    if c.errors:
        print("trace_check: FAIL\n  " + "\n  ".join(c.errors), file=sys.stderr)
        return 1
    print(f"trace_check: ok: {len(events)} events, actors "
          + ", ".join(f"{k}={len(handled.get(v, []))}" for k, v in actor_keys.items())
          + f", {len(ends)} arrows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
