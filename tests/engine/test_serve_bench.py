"""`kvrt-perf serve --quick` (perf/serve_bench.py) as `ninja test` runs it:
four real OpenAI servers (no connector, kvrt CPU, kvrt CPU + disk, vLLM's
pool big) under LMCache-shaped workloads and vLLM's own benchmark client.
A benchmark, not a timed test: what is checked is that it runs, that every
figure it prints is a finite number, that every configuration generated the
same tokens (greedy), and that kvrt hits where prompts repeat (CPU tier in
(b), disk tier in (c))."""

import json
import math
import os
import subprocess
import tempfile

from conftest import REPO, engine_env


def test_kvrt_perf_serve_quick():
    exe = os.path.join(REPO, "build", "plain", "kvrt-perf")
    with tempfile.TemporaryDirectory(prefix="kvrt-serve-test-") as d:
        out = os.path.join(d, "serve.json")
        p = subprocess.run([exe, "serve", "--quick", "--json", out], env=engine_env(),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-6000:]
        print(p.stdout)
        res = json.load(open(out))
    s = res["suites"]["serve"]
    assert s["status"] == 0, s["notes"]
    figs = {f["name"]: f for f in s["figures"]}
    assert len(figs) >= 10, sorted(figs)
    for f in s["figures"]:
        assert f["value"] is not None and math.isfinite(f["value"]), f
        if f["limit_name"]:
            assert f["limit"] is not None and f["limit"] > 0, f
    rows = s["rows"]
    for w in ("ldqa", "mrqa", "sweep"):
        for c, rs in rows[w].items():
            for r in rs:
                for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "req_per_s", "tok_per_s"):
                    assert r[k] is not None and r[k] > 0, (w, c, r)
    query = {c: [r for r in rs if r["round"] == "query"][0] for c, rs in rows["ldqa"].items()}
    assert query["b"]["from_kvrt_cpu"] > 0.5, query["b"]
    assert query["c"]["from_kvrt_disk"] > 0, query["c"]
    assert query["a"]["from_kvrt_cpu"] == 0 and query["a"]["computed"] > 0.9, query["a"]
    assert query["d"]["from_vllm"] > 0.9, query["d"]
