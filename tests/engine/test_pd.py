"""Prefill/decode disaggregation (issue 18) with real servers: vLLM's
OpenAI server as the prefill instance (kvrt's kv_producer) and another as
the decode instance (kv_consumer), on one real redis-server (conftest's
fixture), perf/pd_proxy.py in front.

- Every document through the proxy: generated ids identical to one
  instance alone (the producer asked for the whole completion) and, for
  the first, to the offline engine without kvrt; the decode server's
  prefill is a load (its kvrt hit every whole chunk, vLLM counted them as
  external hits) and it saved nothing.
- The consumer sees a request before the producer has even computed it
  (the decode request sent a second before the prefill): it waits
  (consumer_wait_ms), finds the chunks once written, and loads them.
- Redis restarted empty between prefill and decode: the consumer waits
  consumer_wait_ms, then recomputes: tokens identical, no hang, no load.
- The producer killed (SIGKILL) right after its prefill: the consumer
  loads what landed, recomputes the rest, tokens identical, bounded."""

import os
import signal
import sys
import threading
import time

from conftest import DOCS, KVRT, REPO, expected_hit, tokens
from server import completion, metrics, serve

WAIT_MS = 10000  # the consumer's consumer_wait_ms (generous: 2 busy cores)


def test_pd_proxy_decode_loads_what_prefill_wrote(model_dir, baseline, redis_server):
    sys.path.insert(0, os.path.join(REPO, "perf"))
    import pd_proxy
    import redis_ctl
    # Two servers on 2 cores: the worker's lookup socket may answer late
    # while both forwards spin; a generous deadline keeps hits (the
    # default 250 ms answers "no hit" instead)
    cfg = dict(KVRT, remote_url=redis_server["url"], lookup_timeout_ms=5000)
    # One core each (vLLM's CPU workers spin on theirs)
    with serve(model_dir, kvrt=cfg, kv_role="kv_producer",
               env={"VLLM_CPU_OMP_THREADS_BIND": "0"}) as pre, \
            serve(model_dir, kvrt=dict(cfg, consumer_wait_ms=WAIT_MS), kv_role="kv_consumer",
                  env={"VLLM_CPU_OMP_THREADS_BIND": "1"}) as dec:
        proxy = pd_proxy.Proxy(pre["base"], dec["base"])
        base = f"http://127.0.0.1:{proxy.start()}"
        try:
            got = [completion(base, model_dir, p)[1] for p in DOCS]
            assert proxy.prefill_errors == 0
            m = metrics(dec["base"])
            alone = [completion(pre["base"], model_dir, p)[1] for p in DOCS]
            assert got == alone, "P/D generated other tokens than one instance alone"
            assert got[0] == baseline["server"][0], "P/D differs from the engine without kvrt"
            hit = sum(expected_hit(len(p)) for p in DOCS)
            assert m.get("vllm:kvrt_hit_tokens_total") == hit, "the decode prefill was not a load"
            assert m.get("vllm:external_prefix_cache_hits_total") == hit
            assert m.get("vllm:kvrt_saved_chunks_total", 0) == 0, "the consumer saved prompts"

            # The decode request first, the prefill a second later: the
            # consumer waits for the chunks, then loads them
            q = tokens(55, 640)
            res = {}
            def decode():
                t0 = time.time()
                res["ids"] = completion(dec["base"], model_dir, q)[1]
                res["took"] = time.time() - t0

            t = threading.Thread(target=decode)
            t.start()
            time.sleep(1.0)
            completion(pre["base"], model_dir, q, max_tokens=1)
            t.join(120)
            assert res.get("ids") == completion(pre["base"], model_dir, q)[1]
            assert res["took"] < WAIT_MS / 1000 + 30
            hit += expected_hit(len(q))
            assert metrics(dec["base"]).get("vllm:kvrt_hit_tokens_total") == hit, \
                "the consumer did not wait for the producer's chunks"

            # Redis restarted empty between prefill and decode: recompute
            p = tokens(77, 640)
            completion(pre["base"], model_dir, p, max_tokens=1)
            redis_ctl.stop(redis_server["dir"])
            redis_ctl.start(redis_server["dir"], redis_server["port"])
            t0 = time.time()
            ids = completion(dec["base"], model_dir, p)[1]
            took = time.time() - t0
            assert ids == completion(pre["base"], model_dir, p)[1]
            assert took < WAIT_MS / 1000 + 30, f"the consumer took {took:.0f} s"
            m2 = metrics(dec["base"])
            assert m2.get("vllm:kvrt_hit_tokens_total") == hit, "a hit from an empty Redis"

            # The producer killed (SIGKILL) right after its prefill, its
            # writes perhaps in flight: the consumer loads what landed and
            # recomputes the rest, tokens identical (the reference: the
            # producer alone, under another cache_salt so it shares nothing)
            k = tokens(88, 640)
            want = completion(pre["base"], model_dir, k, cache_salt="reference")[1]
            completion(pre["base"], model_dir, k, max_tokens=1)
            os.killpg(pre["proc"].pid, signal.SIGKILL)
            pre["proc"].wait()
            t0 = time.time()
            assert completion(dec["base"], model_dir, k)[1] == want
            assert time.time() - t0 < WAIT_MS / 1000 + 30
        finally:
            proxy.stop()
