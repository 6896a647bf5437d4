"""kv_role in vLLM's real engine (issue 18): a kv_producer saves and never
loads, a kv_consumer loads what a producer saved and saves nothing of its
prompts, and either alone without a tier another instance reads is refused
at start-up with one clear message. Two engines in two processes on one
real redis-server; tokens identical to one engine without kvrt. (Before:
kvrt ignored kv_role, and a producer loaded on its own repeats.)"""

from conftest import (DOCS, DOCS_B, DOCS_HIT, INPROC, KVRT, LLM_FP32, delta, level, run,
                      same_tokens)


def test_producer_saves_never_loads_consumer_loads_never_saves(model_dir, baseline, redis_server):
    kv = dict(KVRT, remote_url=redis_server["url"])
    base = {"model": model_dir, "kvrt": kv, "llm": LLM_FP32}
    prod = run(dict(base, kv_role="kv_producer", phases=[
        {"prompts": DOCS, "max_tokens": 1},
        {"prompts": DOCS, "max_tokens": 8, "reset_local": True}]), **INPROC)["runs"][0]
    # (the prefill's saves complete after its only step: counted by the next)
    assert level(prod, "kvrt_saved_chunks") == 8
    assert delta(prod, "kvrt_hit_tokens", 1) == 0, "the producer loaded KV"
    assert delta(prod, "external_prefix_cache_hits", 1) == 0
    same_tokens(prod["phases"][1], baseline["docs"], "producer")
    cons = run(dict(base, kv_role="kv_consumer", phases=[
        {"prompts": DOCS, "max_tokens": 8},
        {"prompts": DOCS_B, "max_tokens": 8}]), **INPROC)["runs"][0]
    same_tokens(cons["phases"][0], baseline["docs"], "consumer, KV from the producer")
    same_tokens(cons["phases"][1], baseline["docs_b"], "consumer, new documents")
    assert delta(cons, "kvrt_hit_tokens", 0) == DOCS_HIT
    assert delta(cons, "kvrt_loaded_tokens", 0) == DOCS_HIT
    assert delta(cons, "kvrt_saved_chunks", 0) == 0 and delta(cons, "kvrt_saved_chunks", 1) == 0


def test_producer_without_a_shared_tier_refused(model_dir):
    out = run({"model": model_dir, "kvrt": KVRT, "llm": LLM_FP32, "kv_role": "kv_producer",
               "phases": [{"prompts": DOCS[:1], "max_tokens": 1}]}, expect_fail=True, **INPROC)
    assert "kvrt: kv_role kv_producer needs a tier the other instances read" in out["log"], \
        out["log"][-3000:]
