"""KV events (issue 16) in vLLM's real engine: a subscriber on vLLM's own
ZMQ publisher, decoding with vLLM's event classes, sees kvrt's tiers in
the same stream as vLLM's GPU blocks, under the same block hashes.

The scenario, one in-process engine (its reset reaches kvrt's cache): a
CPU pool of 12 chunks over a disk tier. The documents (8 whole chunks)
are saved: BlockStored for medium CPU, hashes equal to the ones vLLM
publishes for its own GPU blocks of those prompts, with their parents,
token ids and block size. Other documents push some of them out of the
CPU pool to disk: BlockRemoved CPU and BlockStored STORAGE (LOCAL) for
those. A reset of the prefix cache with kvrt's: BlockRemoved for every
chunk left in each medium, so a router replaying the stream ends empty
(and never saw a chunk stored twice or removed unstored).

Redis: every write-behind announced as STORAGE REMOTE; a fresh engine on
the same Redis announces what its lookups find there, then what it loads
into its CPU pool. TP = 2: one announcement per chunk once both ranks
hold it. The example
router (perf/kv_router.py) on two real OpenAI servers that saw different
documents sends each prompt to the server that holds it, from vLLM's GPU
blocks, then (vLLM's caches reset) from kvrt's CPU tier."""

import json
import os
import sys
import tempfile
import time

from conftest import (BLOCK, CHUNK, DOCS, DOCS_B, INPROC, KVRT, LLM_FP32, REPO, run,
                      same_tokens, tokens)
from server import completion, post, serve

SMALL = dict(KVRT, max_local_cpu_size=0.012)  # 12 chunks of 1 MiB


def gpu_blocks(events) -> dict:
    """vLLM's own GPU BlockStored events: block hash -> (parent, tokens)."""
    out = {}
    for e in events:
        if e["type"] == "BlockStored" and e["medium"] == "GPU":
            parent = e["parent_block_hash"]
            for j, h in enumerate(e["block_hashes"]):
                out[h] = (parent, e["token_ids"][j * e["block_size"]:(j + 1) * e["block_size"]])
                parent = h
    return out


def kvrt_events(events, typ, medium, locality=None):
    return [e for e in events if e["type"] == typ and e.get("medium") == medium
            and e["medium"] != "GPU" and (locality is None or e.get("locality") == locality)]


def chunk_hashes(gpu: dict, prompt: list) -> list:
    """The block hashes of prompt's whole chunks, per chunk, from vLLM's."""
    by_tokens = {tuple(t): h for h, (_, t) in gpu.items()}
    per = CHUNK // BLOCK
    out = []
    for c in range(len(prompt) // CHUNK):
        hs = [by_tokens.get(tuple(prompt[(c * per + j) * BLOCK:(c * per + j + 1) * BLOCK]))
              for j in range(per)]
        out.append(hs)
    return out


def test_tier_events_carry_vllm_block_hashes(model_dir, baseline, tmp_path):
    cfg = dict(SMALL, local_disk=str(tmp_path / "disk"), max_local_disk_size=1)
    phases = [{"prompts": DOCS, "max_tokens": 8},
              {"prompts": DOCS_B, "max_tokens": 8, "reset_local": True},
              {"prompts": [[5, 6, 7]], "max_tokens": 1, "reset_kvrt": True}]
    out = run({"model": model_dir, "kvrt": cfg, "llm": LLM_FP32, "phases": phases,
               "kv_events": True}, timeout=600, **INPROC)
    r = out["runs"][0]
    same_tokens(r["phases"][0], baseline["docs"], "documents")
    same_tokens(r["phases"][1], baseline["docs_b"], "other documents")
    ev0, ev1, ev2 = r["events"]
    gpu = gpu_blocks(ev0 + ev1)
    want = {tuple(hs) for p in DOCS for hs in chunk_hashes(gpu, p)}
    assert all(None not in hs for hs in want) and len(want) == 8, "vLLM published no GPU blocks"
    # Saved: one BlockStored CPU per chunk, vLLM's hashes, parent, tokens
    cpu = kvrt_events(ev0, "BlockStored", "CPU")
    assert {tuple(e["block_hashes"]) for e in cpu} == want
    assert len(cpu) == 8, f"{len(cpu)} CPU stores for 8 chunks"
    for e in cpu:
        assert e["block_size"] == BLOCK and e.get("locality") in (None, "LOCAL")
        first = e["block_hashes"][0]
        assert e["parent_block_hash"] == gpu[first][0], "parent differs from vLLM's"
        assert e["token_ids"] == sum((gpu[h][1] for h in e["block_hashes"]), [])
    # Pushed out of the CPU pool to disk: CPU removed, STORAGE stored
    gone = {tuple(e["block_hashes"]) for e in kvrt_events(ev1, "BlockRemoved", "CPU")}
    disk = {tuple(e["block_hashes"]) for e in kvrt_events(ev1, "BlockStored", "STORAGE", "LOCAL")}
    assert gone and gone <= want, "no document chunk left the CPU pool"
    assert disk == gone, "a chunk left the CPU pool without landing on disk"
    # B's chunks are announced in the CPU pool (those the full pool took)
    b_cpu = {tuple(e["block_hashes"]) for e in kvrt_events(ev1, "BlockStored", "CPU")}
    assert b_cpu and not b_cpu & want
    # A router replaying the stream never stores what it holds nor removes
    # what it lacks, and after the reset with kvrt's cache holds nothing
    held = set()
    for e in ev0 + ev1 + ev2:
        if e["type"] not in ("BlockStored", "BlockRemoved") or e["medium"] == "GPU":
            continue
        k = (e["medium"], e.get("locality"), tuple(e["block_hashes"]))
        if e["type"] == "BlockStored":
            assert k not in held, f"stored twice: {k[:2]}"
            held.add(k)
        else:
            assert k in held, f"removed but never stored: {k[:2]}"
            held.discard(k)
    assert not held, f"after reset: {len(held)} chunks still announced"
    assert kvrt_events(ev2, "BlockRemoved", "CPU"), "the reset removed nothing"
    assert r["resets"] == [True, True]


def test_redis_tier_announced_and_found_by_a_fresh_engine(model_dir, baseline, redis_server):
    """Redis (a real redis-server): the write-behinds announce every chunk
    as STORAGE REMOTE; a fresh engine on the same Redis (its own tiers
    empty) announces them when its lookups find them there, then in its
    CPU pool once loaded; tokens identical."""
    # Lookups wait for Redis's answer (the default 5 ms gives up under a
    # loaded machine: the chunk is then recomputed, not loaded)
    cfg = dict(KVRT, remote_url=redis_server["url"], remote_lookup_wait_ms=2000)
    spec = {"model": model_dir, "kvrt": cfg, "llm": LLM_FP32, "kv_events": True,
            "phases": [{"prompts": DOCS, "max_tokens": 8}]}
    out = run({"runs": [spec, spec]}, timeout=900, **INPROC)
    first, fresh = out["runs"]
    gpu = gpu_blocks(first["events"][0])
    want = sorted(tuple(hs) for p in DOCS for hs in chunk_hashes(gpu, p))
    for r, what in ((first, "saving engine"), (fresh, "fresh engine")):
        same_tokens(r["phases"][0], baseline["docs"], what)
        remote = kvrt_events(r["events"][0], "BlockStored", "STORAGE", "REMOTE")
        assert sorted(tuple(e["block_hashes"]) for e in remote) == want, what
    cpu = kvrt_events(fresh["events"][0], "BlockStored", "CPU")
    assert sorted(tuple(e["block_hashes"]) for e in cpu) == want, "loaded chunks not announced"


def test_tp2_a_chunk_is_announced_once_every_rank_holds_it(model_dir):
    """TP = 2 (two worker processes, each saving its shard): one
    BlockStored CPU per chunk, not one per rank; with rank 1 saving
    nothing (test hook) no chunk is loadable, and none is announced."""
    llm = dict(LLM_FP32, tensor_parallel_size=2)
    base = {"model": model_dir, "llm": llm, "kvrt": KVRT, "kv_events": True,
            "phases": [{"prompts": DOCS, "max_tokens": 8}]}
    out = run({"runs": [base, dict(base, env={"KVRT_DEBUG": "skip_saves_rank=1"})]},
              timeout=1200, VLLM_CPU_OMP_THREADS_BIND="0|1")
    b, c = out["runs"]
    ev = b["events"][0]
    gpu = gpu_blocks(ev)
    want = [tuple(hs) for p in DOCS for hs in chunk_hashes(gpu, p)]
    cpu = [tuple(e["block_hashes"]) for e in kvrt_events(ev, "BlockStored", "CPU")]
    assert sorted(cpu) == sorted(want), f"{len(cpu)} CPU stores for {len(want)} chunks"
    assert not kvrt_events(c["events"][0], "BlockStored", "CPU"), \
        "announced while rank 1 holds nothing"
    assert gpu_blocks(c["events"][0]), "vLLM's own events stopped"


def test_router_sends_each_prompt_to_the_server_holding_it(model_dir):
    sys.path.insert(0, os.path.join(REPO, "perf"))
    import kv_router
    owner = ["A", "A", "B", "B"]  # who saw which document
    with tempfile.TemporaryDirectory(prefix="kvrt-router-") as d:
        eps = {n: f"ipc://{d}/{n}" for n in "AB"}
        router = kv_router.Router(eps)  # ZMQ connects once the servers bind
        try:
            args = {n: ["--kv-events-config", json.dumps(
                {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": eps[n],
                 "topic": "kv"})] for n in "AB"}
            with serve(model_dir, args=args["A"]) as a, serve(model_dir, args=args["B"]) as b:
                srv = {"A": a, "B": b}
                time.sleep(1)  # subscribed before the first event
                for i, p in enumerate(DOCS):
                    completion(srv[owner[i]]["base"], model_dir, p)

                def routed(medium, n):
                    want = [{"instance": owner[i], "medium": medium, "tokens": n}
                            for i in range(len(DOCS))]
                    got = None
                    for _ in range(60):
                        got = [{k: router.best(p)[k] for k in ("instance", "medium", "tokens")}
                               for p in DOCS]
                        if got == want:
                            return
                        for s in srv.values():  # a step brings the last saves' events
                            completion(s["base"], model_dir, [3, 4, 5], max_tokens=1)
                        time.sleep(0.5)
                    assert got == want, f"routed {got}, want {want}"

                # vLLM's own blocks: the whole 640-token prompts (5 blocks)
                routed("GPU", len(DOCS[0]) // BLOCK * BLOCK)
                # vLLM's prefix caches reset (AllBlocksCleared): kvrt's CPU
                # tier still holds the whole chunks
                for s in srv.values():
                    post(s["base"] + "/reset_prefix_cache", {}).close()
                routed("CPU", len(DOCS[0]) // CHUNK * CHUNK)
                assert router.best(tokens(999, 640))["instance"] is None
        finally:
            router.close()
