"""Tenants in vLLM's real engine: two cache_salts never share KV, in any
kvrt tier. Tenant A's documents go through the CPU tier, the disk tier
(a CPU pool of 12 chunks under 24) and Redis (a real redis-server); the
same prompts under another salt hit nothing, in the engine that saved them
and in fresh engines (other processes) reading only Redis or only the disk
directory; tenant A's repeats hit (the positive control). Tokens identical
to a run without kvrt throughout."""

import shutil
import tempfile

from conftest import DOCS, DOCS_B, DOCS_HIT, INPROC, KVRT, LLM_FP32, delta, level, run, same_tokens


def phases(*salts):
    return [{"prompts": DOCS, "max_tokens": 8, "salt": s, "reset_local": i > 0}
            for i, s in enumerate(salts)]


def test_salts_never_share_kv_in_any_tier(model_dir, baseline, redis_server):
    redis_url = redis_server["url"]
    disk = tempfile.mkdtemp(prefix="kvrt-engine-tenants-")
    small = dict(KVRT, max_local_cpu_size=0.012)
    both = dict(small, local_disk=disk, max_local_disk_size=1, remote_url=redis_url)
    try:
        first = {"model": model_dir, "kvrt": both, "llm": LLM_FP32, "phases": [
            {"prompts": DOCS, "max_tokens": 8, "salt": "tenant-a"},
            {"prompts": DOCS_B, "max_tokens": 8, "salt": "tenant-a"},  # DOCS go to disk
            {"prompts": DOCS, "max_tokens": 8, "salt": "tenant-b", "reset_local": True},
            {"prompts": DOCS, "max_tokens": 8, "salt": "tenant-a", "reset_local": True}]}
        a = run(first, **INPROC)["runs"][0]
        assert level(a, "kvrt_demoted_to_disk") > 0, "nothing went to disk: the test lost its point"
        assert delta(a, "kvrt_hit_tokens", 2) == 0, "tenant b hit tenant a's KV"
        assert delta(a, "kvrt_hit_tokens", 3) == DOCS_HIT
        redis_only = {"model": model_dir, "kvrt": dict(small, remote_url=redis_url),
                      "llm": LLM_FP32, "phases": phases("tenant-c", "tenant-a")}
        r = run(redis_only, **INPROC)["runs"][0]
        assert delta(r, "kvrt_hit_tokens", 0) == 0, "tenant c hit through Redis"
        assert delta(r, "kvrt_hit_tokens", 1) == DOCS_HIT
        assert level(r, "kvrt_remote_hits") > 0
        disk_only = {"model": model_dir, "llm": LLM_FP32, "phases": phases("tenant-c", "tenant-a"),
                     "kvrt": dict(small, local_disk=disk, max_local_disk_size=1)}
        d = run(disk_only, **INPROC)["runs"][0]
        assert delta(d, "kvrt_hit_tokens", 0) == 0, "tenant c hit through the disk tier"
        assert delta(d, "kvrt_hit_tokens", 1) > 0
        assert level(d, "kvrt_promoted_from_disk") > 0
        for x in (a, r, d):
            for i, got in enumerate(x["phases"]):
                want = baseline["docs_b"] if x is a and i == 1 else baseline["docs"]
                same_tokens(got, want, f"phase {i}")
            assert level(x, "kvrt_load_errors") == 0 and level(x, "kvrt_pins") == 0
    finally:
        shutil.rmtree(disk, ignore_errors=True)
