#!/usr/bin/env python3
"""perf/shim_bench.py: what kvrt costs a vLLM step, measured in vLLM.

vLLM 0.33's real v1 Scheduler and worker-side connector glue drive
KvrtConnectorV1 (the harness of tests/python: CPU tensors, a tiny 2-layer
Llama, kvrt's host backend). Every call vLLM makes into the connector, on
the scheduler side and on the worker side, is timed; the sum per step is
kvrt's cost as vLLM pays it: the Python shim, the ctypes calls and the C
work behind them.

Workload: 0% reuse. 64 requests with random 64-token prompts arrive at
once (one admission step: lookups that miss, the saves of their chunks),
then decode 64 tokens each: the steps that dominate serving. Reported: the
connector's time in the admission step, and per decode step p50/p99, next
to the time the rest of the step took (vLLM's scheduler and the harness's
fake model; a reference, not a limit: a GPU forward is far longer).

  .venv/bin/python perf/shim_bench.py [--json FILE]
"""

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
import conftest  # noqa: E402,F401  (the tests' environment: offline vLLM, kvrt on sys.path, KVRT_LIB)

N, PROMPT, DECODE = 64, 64, 64

SCHED = ["get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
         "request_finished", "update_connector_output", "get_kv_connector_stats"]
WORKER = ["handle_preemptions", "bind_connector_metadata", "clear_connector_metadata",
          "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
          "get_finished", "get_block_ids_with_load_errors", "get_kv_connector_stats",
          "build_connector_worker_meta"]


def timed(obj, names, acc, per, side):
    for name in names:
        f = getattr(obj, name, None)
        if f is None:
            continue

        def wrap(*a, _f=f, _n=f"{side}.{name}", **k):
            t0 = time.perf_counter_ns()
            try:
                return _f(*a, **k)
            finally:
                d = time.perf_counter_ns() - t0
                acc[0] += d
                per[_n] = per.get(_n, 0) + d

        setattr(obj, name, wrap)


def main():
    import random
    import vllm_harness as H
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    d = H.make_model_dir()
    cfg = {"chunk_size": "16", "max_local_cpu_size": "0.5", "device": "host"}
    blocks = N * ((PROMPT + DECODE) // H.BLOCK + 2) + 16
    eng = H.Engine(d, num_blocks=blocks, extra=cfg, max_batched=N * PROMPT, max_seqs=N)
    acc, per, dec_per = [0], {}, {}
    timed(eng.sc, SCHED, acc, per, "scheduler")
    timed(eng.wc, WORKER, acc, per, "worker")
    rng = random.Random(5)
    for i in range(N):
        eng.add(f"r{i}", [rng.randrange(10, 500) for _ in range(PROMPT)], max_tokens=DECODE)
    steps, admit_per = [], {}
    try:
        while eng.sched.has_requests() and len(steps) < 4 * DECODE:
            acc[0] = 0
            per.clear()
            t0 = time.perf_counter_ns()
            _, sched = eng.step()
            total = time.perf_counter_ns() - t0
            steps.append((len(sched), sum(sched.values()), acc[0], total))
            if len(steps) == 1:
                admit_per = {k: v / 1e3 for k, v in per.items()}
            if len(sched) == N and sum(sched.values()) == N:
                for k, v in per.items():
                    dec_per.setdefault(k, []).append(v / 1e3)
        eng.wc.flush()
        st = eng.wc.stats()
    finally:
        eng.close()
    admit = steps[0]
    dec = [s for s in steps[1:] if s[0] == N and s[1] == N]
    kv = sorted(s[2] / 1e3 for s in dec)
    rest = sorted((s[3] - s[2]) / 1e3 for s in dec)
    res = {"requests": N, "prompt": PROMPT, "decode": DECODE, "steps": len(steps),
           "admission_step": {"requests": admit[0], "tokens": admit[1], "kvrt_us": admit[2] / 1e3,
                              "rest_us": (admit[3] - admit[2]) / 1e3},
           "decode_steps": len(dec), "decode_kvrt_us_p50": statistics.median(kv),
           "decode_kvrt_us_p99": kv[int(0.99 * (len(kv) - 1))],
           "decode_rest_us_p50": statistics.median(rest), "saved_chunks": st["save_chunks"],
           "decode_us_p50_by_call": {k: statistics.median(v) for k, v in sorted(dec_per.items())},
           "admission_us_by_call": dict(sorted(admit_per.items()))}
    print(f"shim_bench: vLLM's scheduler + worker glue driving KvrtConnectorV1 (host backend, 2 layers), "
          f"{N} requests x {PROMPT}-token random prompts, {DECODE} decode steps; 0% reuse")
    print(f"  admission step ({admit[0]} requests, {admit[1]} tokens): kvrt {admit[2] / 1e3:8.1f} us"
          f"   (rest of the step {(admit[3] - admit[2]) / 1e3:8.1f} us)")
    print(f"  decode step, {N} running requests:    kvrt {res['decode_kvrt_us_p50']:8.1f} us p50, "
          f"{res['decode_kvrt_us_p99']:.1f} us p99   (rest of the step {res['decode_rest_us_p50']:8.1f} us p50)")
    print(f"  saved {st['save_chunks']} chunks; {len(dec)} full decode steps of {len(steps)}")
    print("  admission step by call (us): " + ", ".join(
        f"{k.split('.')[1]} {v:.0f}" for k, v in res["admission_us_by_call"].items() if v >= 1))
    print("  decode step by call (p50 us): " + ", ".join(
        f"{k.split('.')[1]} {v:.1f}" for k, v in res["decode_us_p50_by_call"].items() if v >= 0.5))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
