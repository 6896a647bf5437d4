"""KvrtConnectorV1 under vLLM's REAL v1 Scheduler, worker side on CPU tensors
(harness: vllm_harness.py, recipe: VLLM-RECIPE.md)."""

import os
import shutil
import tempfile

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

import vllm_harness as H  # noqa: E402

BASE = {"chunk_size": "16", "max_local_cpu_size": "0.05", "device": "host"}


@pytest.fixture(scope="module")
def model_dir():
    d = H.make_model_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# Every scenario runs with vLLM's own prefix caching off and on (vLLM's
# default). With it on, Engine.add() empties vLLM's cache first, so repeats
# are kvrt's hits; keep_local=True keeps it for partial local hits.
PREFIX_CACHING = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["pc-off", "pc-on"])
def prefix_caching(request):
    PREFIX_CACHING[0] = request.param
    return request.param


def engine(model_dir, extra=None, **kw):
    cfg = dict(BASE)
    cfg.update(extra or {})
    kw.setdefault("prefix_caching", PREFIX_CACHING[0])
    return H.Engine(model_dir, extra=cfg, **kw)


def pins(eng):
    eng.wc.flush()
    return eng.wc.stats()["pinned"]


def save(eng, rid, prompt, **kw):
    """Request rid of prompt run to its end, its saves flushed."""
    eng.add(rid, prompt, **kw)
    eng.run()
    eng.wc.flush()


def drain(eng):
    """Run every request to its end: vLLM's blocks all free, kvrt's pins 0
    (assert_empty waits for saves still copying)."""
    eng.run()
    eng.assert_empty()
    assert pins(eng) == 0


def test_hit_loads_identical_kv_and_schedules_tail(model_dir):
    with engine(model_dir) as eng:
        P = H.prompt(1)
        save(eng, "A", P)
        assert eng.wc.stats()["chunks"] == 2  # 40 tokens: two full 16-token chunks
        eng.add("B", P)
        so, sched = eng.step()
        assert sched == {"B": 8}  # 32 loaded, only the tail computed
        assert so.has_sync_kv_loads
        assert H.verify_loaded(eng, "B", 32)  # blocks were zeroed: a real load
        eng.run()
        eng.assert_empty()
        st = eng.wc.stats()
        assert st["load_chunks"] == 2 and st["load_failed_chunks"] == 0
        assert pins(eng) == 0


def test_reset_cache_then_miss(model_dir):
    with engine(model_dir) as eng:
        P = H.prompt(11)
        save(eng, "A", P)
        eng.add("B", P)
        so, sched = eng.step()
        assert sched == {"B": 8}  # a hit
        drain(eng)
        assert eng.sc.reset_cache() is True
        assert eng.wc.reset_cache() is None  # worker side: not its call
        eng.add("C", P)
        so, sched = eng.step()
        assert sched == {"C": 40}  # reset: the same prompt misses
        drain(eng)


def test_cache_salt_isolates(model_dir):
    with engine(model_dir) as eng:
        P = H.prompt(2)
        save(eng, "A", P, cache_salt="tenant-a")
        eng.add("B", P, cache_salt="tenant-b")
        so, sched = eng.step()
        assert sched == {"B": 40}
        eng.run()
        eng.add("C", P, cache_salt="tenant-a")
        so, sched = eng.step()
        assert sched == {"C": 8}
        assert H.verify_loaded(eng, "C", 32)
        drain(eng)


def test_corrupt_chunk_is_recomputed(model_dir):
    with engine(model_dir) as eng:
        P = H.prompt(3)
        save(eng, "A", P)
        b = eng.add("B", P)
        assert eng.sc.debug_corrupt_chunk(b, 1) == 0
        so, s1 = eng.step()
        so, s2 = eng.step()
        assert s1 == {"B": 8}
        assert s2 == {"B": 24}  # truncated to the bad block, 16..39 recomputed
        assert eng.wc.stats()["checksum_failures"] == 1
        drain(eng)
        # The bad chunk was dropped and the recompute saved it again: the
        # next request with that prompt hits both chunks, loads the right
        # KV, and nothing fails again.
        eng.add("C", P)
        so, s3 = eng.step()
        assert s3 == {"C": 8}
        assert H.verify_loaded(eng, "C", 32)
        drain(eng)
        assert eng.wc.stats()["checksum_failures"] == 1


def test_load_wait_counts_only_steps_that_load(model_dir):
    """load_wait_ms is the time vLLM waited for kvrt's loads: steps that
    load nothing (a miss, decode) add nothing, not start_load_kv's own
    call; a loading step does."""
    class Waited(dict):  # every ns added, also those already reported
        total = 0

        def __setitem__(self, k, v):
            if k == "load_wait_ms" and v > self.get(k, 0):
                Waited.total += v - self.get(k, 0)
            super().__setitem__(k, v)

    with engine(model_dir) as eng:
        eng.wc._track.wait_ns = Waited(eng.wc._track.wait_ns)
        P = H.prompt(12)
        eng.add("A", P, max_tokens=6)
        drain(eng)
        assert Waited.total == 0, f"{Waited.total} ns counted on steps that load nothing"
        eng.add("B", P)
        drain(eng)
        assert eng.wc.stats()["load_chunks"] == 2
        assert Waited.total > 0


def test_reset_prefix_cache_right_after_a_saving_request(model_dir):
    """A finished request whose saves are complete gives its blocks back
    at once (no delay_free): vLLM's reset_prefix_cache right after it
    succeeds, with no engine step in between."""
    with engine(model_dir) as eng:
        eng.add("A", H.prompt(13), max_tokens=6)
        eng.step()        # prefill: saves 2 chunks
        eng.wc.flush()    # ... whose copies are done
        # decode until A's last token, not one step more (vLLM's offline
        # loop stops there too)
        while "A" in eng.sched.requests and not eng.sched.requests["A"].is_finished():
            eng.step()
        assert eng.sched.reset_prefix_cache() is True, "A's blocks are still held"
        drain(eng)
        assert eng.wc.stats()["save_chunks"] == 2


def spy_lookups(eng):
    """Every (request id, num_computed, answer) of the scheduler's lookups."""
    seen = []
    orig = eng.sc.get_num_new_matched_tokens

    def spy(req, n):
        out = orig(req, n)
        seen.append((req.request_id, n, out))
        return out

    eng.sc.get_num_new_matched_tokens = spy
    return seen


def test_preemption_resume_no_leaks(model_dir):
    with engine(model_dir, num_blocks=9) as eng:
        seen = spy_lookups(eng)
        eng.add("A", H.prompt(4), max_tokens=40)
        eng.add("B", H.prompt(5), max_tokens=40)
        checked = 0
        for _ in range(300):
            if not eng.sched.has_requests():
                break
            k = len(seen)
            eng.step()
            # A resumed request's load is the KV it had before preemption,
            # even though the blocks it was saved from went to the other
            # request while the save may still have been copying them.
            hits = {rid: n + o[0] for rid, n, o in seen[k:] if o[0]}
            for rid, n in hits.items():
                if rid in eng.wreq:
                    assert H.verify_loaded(eng, rid, n), f"{rid}: wrong KV loaded"
                    checked += 1
        if not eng.prefix_caching:  # on: vLLM's own cache may serve the resume
            assert checked, "a resumed request loaded from kvrt"
            assert any(o[0] > 0 for _, _, o in seen), "the resumed request hit kvrt"
        eng.assert_empty()
        assert pins(eng) == 0


def test_partial_local_hit_then_kvrt(model_dir, prefix_caching):
    """vLLM's prefix cache holds a prompt's first blocks, kvrt its next
    chunks: kvrt loads exactly tokens [local, local + n) into exactly the
    blocks that hold them (every block checked bit for bit). The defect this
    pins down: the load started at request.num_computed_tokens, still 0 when
    vLLM calls update_state_after_alloc, so tokens [0, n) went into the
    blocks of [local, local + n) and vLLM then cached them."""
    if not prefix_caching:
        pytest.skip("needs vLLM's own prefix cache")
    with engine(model_dir, keep_local=True) as eng:
        seen = spy_lookups(eng)
        P = H.prompt(30, n=72)                 # 4 full chunks + 8 tokens
        save(eng, "A", P)
        assert eng.wc.stats()["chunks"] == 4
        assert eng.drop_local()                # vLLM forgets A; kvrt keeps it
        eng.add("C", P[:40])                   # kvrt serves 32, vLLM caches blocks 0-1
        eng.run()
        assert {0, 1} <= {i for i, b in enumerate(H.prompt_blocks(eng, P))
                          if b in eng.local_cached_blocks()}
        k = len(seen)
        eng.add("B", P)
        so, sched = eng.step()
        assert seen[k] == ("B", 32, (32, False)), seen[k:]  # local 32, kvrt 32 more
        assert sched == {"B": 8}
        assert so.has_sync_kv_loads
        assert H.verify_loaded(eng, "B", 64), "kvrt loaded the wrong tokens"
        eng.run()
        # vLLM now caches B's blocks: a third request hitting them locally
        # (all 64 tokens: kvrt has nothing more) reads what kvrt wrote.
        eng.add("D", P + [5, 6, 7])
        so, sched = eng.step()
        assert sched == {"D": 11}
        assert H.verify_loaded(eng, "D", 64)
        drain(eng)


def test_preemption_partial_local_then_kvrt(model_dir, prefix_caching):
    """Requests preempted and resumed while vLLM's prefix cache keeps only
    their first blocks: each resume takes the head from vLLM and the next
    chunks from kvrt, and every block of every resumed request holds
    exactly the KV of its tokens."""
    if not prefix_caching:
        pytest.skip("needs vLLM's own prefix cache")
    with engine(model_dir, num_blocks=12, keep_local=True) as eng:
        seen = spy_lookups(eng)
        eng.add("A", H.prompt(40, n=72), max_tokens=40)
        eng.add("B", H.prompt(41, n=72), max_tokens=40)
        partial = checked = 0
        for _ in range(400):
            if not eng.sched.has_requests():
                break
            blocks = {r: list(st["blocks"]) for r, st in eng.wreq.items()}
            k = len(seen)
            so, _ = eng.step()
            for rid, n, o in seen[k:]:
                if o[0] and rid in eng.wreq:
                    assert H.verify_loaded(eng, rid, n + o[0]), f"{rid}: wrong KV"
                    checked += 1
                    partial += n > 0
            # A preempted request's blocks went back to vLLM's cache: keep
            # only its first two there, so its resume is local + kvrt.
            for rid in so.preempted_req_ids or ():
                eng.sched.kv_cache_manager.evict_blocks(set(blocks.get(rid, [])[2:]))
        assert partial, ("no resume took a local head and kvrt's chunks", eng.log[-5:])
        drain(eng)


def test_delay_free_released(model_dir, monkeypatch):
    # The save actor reports its copies done 300 ms late (test hook): the
    # request finishes while they may still read its blocks.
    monkeypatch.setenv("KVRT_DEBUG", "slow_saves=300")
    eng = engine(model_dir)
    delays = []
    orig = eng.sc.request_finished

    def spy(req, bids):
        out = orig(req, bids)
        delays.append(out[0])
        return out

    eng.sc.request_finished = spy
    try:
        eng.add("A", H.prompt(6), max_tokens=1)  # finishes in the step that saves
        eng.run()
        assert delays == [True]
        import time
        t0 = time.time()
        while eng.sched.has_requests() and time.time() - t0 < 10:
            eng.step()  # empty steps until the worker reports the saves done
            time.sleep(0.02)
        eng.assert_empty()  # blocks came back through finished_sending
        assert pins(eng) == 0
    finally:
        eng.close()


def test_abort_during_async_load_no_leaks(model_dir):
    with engine(model_dir, extra={"enable_async_loading": "true"}) as eng:
        from vllm.v1.request import RequestStatus
        P = H.prompt(7)
        save(eng, "A", P)
        eng.add("D", P)
        so, sched = eng.step()
        assert sched == {}
        eng.sched.finish_requests("D", RequestStatus.FINISHED_ABORTED)
        eng.run()
        for _ in range(3):
            eng.step()
        eng.assert_empty()
        assert pins(eng) == 0


def disk_engine(model_dir, d, **extra):
    """A CPU pool of a few chunks over a disk tier in d: earlier prompts are
    demoted to disk."""
    return engine(model_dir, extra={"local_disk": d, "max_local_disk_size": "0.05",
                                    "max_local_cpu_size": str(8 * 8192 / 2**30), **extra})


def save_then_demote(eng, P):
    """Request A saves P; six other prompts push A's chunks to disk."""
    eng.add("A", P)
    eng.run()
    for i in range(6):
        eng.add(f"F{i}", H.prompt(20 + i))
        eng.run()
    eng.wc.flush()


def step_until_scheduled(eng, tries=400, pause=0.001):
    """Step until vLLM schedules something (a request waited for kvrt):
    the last step's scheduler output and scheduled tokens."""
    import time
    so, sched = None, {}
    for _ in range(tries):
        so, sched = eng.step()
        if sched:
            break
        time.sleep(pause)
    return so, sched


def test_async_load_from_disk(model_dir):
    d = tempfile.mkdtemp(prefix="kvrt-disk-")
    eng = disk_engine(model_dir, d, enable_async_loading="true")
    try:
        P = H.prompt(8)
        save_then_demote(eng, P)
        eng.add("B", P)
        so, sched = eng.step()
        assert sched == {}
        assert eng.sched.requests["B"].status.name == "WAITING_FOR_REMOTE_KVS"
        assert eng.wc.stats()["prefetches"] > 0  # A's chunks came from disk
        so, sched = step_until_scheduled(eng, tries=200, pause=0)
        assert sched == {"B": 8}
        assert H.verify_loaded(eng, "B", 32)
        drain(eng)
    finally:
        eng.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("wait_ms", ["1000", "0"])
def test_sync_load_from_disk(model_dir, wait_ms):
    """Without async loading a hit found on disk is brought into the CPU
    tier while vLLM asks again (None: the request waits, nothing blocks),
    then loaded in the step; prefetch_wait_ms 0 schedules it at once with
    only what the CPU tier holds (nothing here)."""
    d = tempfile.mkdtemp(prefix="kvrt-disk-")
    eng = disk_engine(model_dir, d, prefetch_wait_ms=wait_ms)
    seen = spy_lookups(eng)
    try:
        P = H.prompt(8)
        save_then_demote(eng, P)
        k = len(seen)
        eng.add("B", P)
        so, sched = eng.step()
        if wait_ms == "0":
            assert sched == {"B": 40}, sched  # A's chunks are on disk: no CPU hit
        else:
            assert sched == {}
            assert seen[k][2] == (None, False), seen[k:]
            assert eng.sched.requests["B"].status.name == "WAITING"
            so, sched = step_until_scheduled(eng)
            assert sched == {"B": 8}, (sched, seen[k:])
            assert so.has_sync_kv_loads
            assert H.verify_loaded(eng, "B", 32)
            assert eng.wc.stats()["prefetches"] > 0
        drain(eng)
    finally:
        eng.close()
        shutil.rmtree(d, ignore_errors=True)


def _capture_stats(eng):
    """Every kv_connector_stats payload update_from_output produces."""
    seen = []
    orig = eng.sched.update_from_output

    def spy(so, mro):
        out = orig(so, mro)
        for eco in out.values():
            st = getattr(eco, "scheduler_stats", None)
            if st is not None and st.kv_connector_stats:
                seen.append(dict(st.kv_connector_stats))
        return out

    eng.sched.update_from_output = spy
    return seen


def _interval(eng, seen):
    """The payloads merged and reduced as vLLM's logger does."""
    cls = type(eng.sc)
    acc = None
    for d in seen:
        s = cls.build_kv_connector_stats(d)
        acc = s if acc is None else acc.aggregate(s)
    seen.clear()
    return acc.reduce() if acc is not None and not acc.is_empty() else {}


def test_stats_hit_and_corrupt_agree(model_dir):
    with engine(model_dir) as eng:
        seen = _capture_stats(eng)
        P = H.prompt(9)
        save(eng, "A", P)
        eng.step()  # the flushed saves reach a report
        r = _interval(eng, seen)
        assert r.get("saved_tokens", 0) == 32 and r.get("saved_chunks") == 2
        assert r["saved_bytes"] == 32 * 2 * H.NUM_KV_HEADS * 2 * H.HEAD * 4
        assert r.get("hit_tokens", 0) == 0 and r.get("load_errors", 0) == 0
        assert r["pool_bytes"] > 0 and 0 < r["pool_used_bytes"] <= r["pool_bytes"]
        eng.add("B", P)
        eng.run()
        r = _interval(eng, seen)
        assert r["hit_tokens"] == r["loaded_tokens"] == 32
        assert r["hit_not_loaded_tokens"] == 0 and r.get("load_errors", 0) == 0
        assert r["loaded_bytes"] == 32 * 2 * H.NUM_KV_HEADS * 2 * H.HEAD * 4
        assert r["hit_requests"] == 1 and r["loaded_chunks"] == 2
        # corrupt chunk 1 of the cached prompt: one load error, 16 tokens lost
        c = eng.add("C", P)
        assert eng.sc.debug_corrupt_chunk(c, 1) == 0
        eng.run()
        r = _interval(eng, seen)
        assert r["load_errors"] == 1 and r["checksum_failures"] == 1
        assert r["hit_tokens"] == 32 and r["loaded_tokens"] == 16
        assert r["hit_not_loaded_tokens"] == 16
        eng.assert_empty()


def test_prom_metrics_record_stats(model_dir):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()

    def bind(cls):
        class C(cls):
            def __init__(self, *a, **k):
                k["registry"] = reg
                k.pop("multiprocess_mode", None)
                super().__init__(*a, **k)
        return C

    vc = H.make_vllm_config(model_dir, extra=dict(BASE))
    from kvrt.vllm import KvrtConnectorV1
    pm = KvrtConnectorV1.build_prom_metrics(
        vc, {Gauge: bind(Gauge), Counter: bind(Counter), Histogram: bind(Histogram)},
        ["model_name", "engine"], {0: ["m", "0"]})
    pm.observe({"loaded_tokens": 32, "load_errors": 1, "pool_used_bytes": 4096}, 0)
    pm.observe({"loaded_tokens": 16, "pool_used_bytes": 8192}, 0)
    lv = {"model_name": "m", "engine": "0"}
    assert reg.get_sample_value("vllm:kvrt_loaded_tokens_total", lv) == 48
    assert reg.get_sample_value("vllm:kvrt_load_errors_total", lv) == 1
    assert reg.get_sample_value("vllm:kvrt_pool_used_bytes", lv) == 8192


def test_lora_isolates(model_dir):
    from vllm.lora.request import LoRARequest
    with engine(model_dir) as eng:
        P = H.prompt(10)
        la = LoRARequest("adapter-a", 1, "/nonexistent/a")
        lb = LoRARequest("adapter-b", 2, "/nonexistent/b")
        save(eng, "A", P, lora=la)
        assert eng.wc.stats()["chunks"] == 2
        eng.add("B", P, lora=lb)
        so, sched = eng.step()
        assert sched == {"B": 40}  # another adapter: no hit
        eng.run()
        eng.add("N", P)
        so, sched = eng.step()
        assert sched == {"N": 40}  # no adapter: no hit either
        eng.run()
        eng.add("C", P, lora=la)
        so, sched = eng.step()
        assert sched == {"C": 8}  # the same adapter hits
        assert H.verify_loaded(eng, "C", 32)
        drain(eng)


@pytest.mark.parametrize("decode", [False, True])
def test_save_decode_cache(model_dir, decode):
    """Decode KV is saved only with save_decode_cache (the shim skips
    requests past their prompt otherwise); config_get reads kvrt's config."""
    with engine(model_dir, {"save_decode_cache": "true" if decode else "false"}) as eng:
        assert eng.sc.config_get("save_decode_cache") == ("true" if decode else "false")
        assert eng.sc.config_get("chunk_size") == "16"
        assert eng.sc.config_get("no_such_key") is None
        P = H.prompt(6, n=24)                  # a full chunk and an 8-token tail
        eng.add("A", P, max_tokens=30)         # KV for 24 + 29 tokens
        eng.run()
        eng.wc.flush()
        Q = P + [eng.sent_tokens] * 29 + [1, 2, 3]  # A's tokens, then new ones
        eng.add("B", Q)
        _, sched = eng.step()
        hit = len(Q) - sched["B"]
        assert hit == (48 if decode else 16), (hit, eng.log[-1])
        drain(eng)


@pytest.fixture(scope="module")
def redis_url():
    """A real redis-server on a free loopback port, for this module."""
    import socket
    import subprocess
    import time
    exe = shutil.which("redis-server") or pytest.skip("redis-server is not installed (./configure)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() - t0 > 10:
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait()


def save_to_redis(eng, rid, prompt):
    """Request rid of prompt run to its end, its two full chunks written
    to Redis (the write-behinds waited for, 10 s at most)."""
    import time
    save(eng, rid, prompt)
    t0 = time.monotonic()
    while eng.wc.stats()["remote_writes"] < 2 and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert eng.wc.stats()["remote_writes"] >= 2


def test_remote_hit_asks_again_instead_of_blocking(model_dir, redis_url, prefix_caching):
    """A second engine with an empty local cache finds a prompt the first
    one wrote to Redis: the first scheduler pass gets None (Redis asked; the
    scheduler goes on), a later pass the hit, loaded asynchronously, exact."""
    import time
    # a generous wait: a loaded CI machine may answer after the default 5 ms
    cfg = {"remote_url": redis_url, "enable_async_loading": "true", "remote_lookup_wait_ms": "1000"}
    P = H.prompt(9 + 100 * prefix_caching)  # one Redis for both runs: a new prompt each
    e1 = engine(model_dir, cfg)
    try:
        save_to_redis(e1, "A", P)
    finally:
        e1.close()
    e2 = engine(model_dir, cfg)
    seen = spy_lookups(e2)
    try:
        e2.add("B", P)
        _, sched = step_until_scheduled(e2)
        answers = [o for _, _, o in seen]
        assert answers[0] == (None, False), answers[:3]
        assert (32, True) in answers, answers
        assert sched == {"B": 8}
        assert H.verify_loaded(e2, "B", 32)
        e2.run()
        e2.assert_empty()
        assert pins(e2) == 0
    finally:
        e2.close()


def test_kv_events_name_vllm_block_hashes(model_dir, tmp_path):
    """vLLM's scheduler, its worker glue and its ZMQ publisher (a real SUB
    socket, vLLM's KVEventBatch decoder): a saved prompt's chunks are
    announced in medium CPU under vLLM's hashes of its blocks (the
    request's, and with prefix caching on the ones vLLM publishes for its
    own blocks), with their parent and tokens; a reset of kvrt's cache
    removes them."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch
    ep = f"ipc://{tmp_path}/kv"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ep)
    dec = msgspec.msgpack.Decoder(type=KVEventBatch)

    def events(eng):
        got = []
        for _ in range(20):  # a worker's events reach the publisher with a step
            eng.step()
            while sub.poll(200):
                got += dec.decode(sub.recv_multipart()[-1]).events
        return got

    try:
        with engine(model_dir, kv_events=ep) as eng:
            import time
            time.sleep(0.3)  # the publisher bound and the SUB connected
            from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as conv
            P = H.prompt(1)  # 40 tokens: two chunks of 16
            req = eng.add("A", P)
            eng.run()
            eng.wc.flush()
            ev = events(eng)
            hashes = [conv(h) for h in req.block_hashes[:2]]  # vLLM's, of P's blocks
            gpu = {}
            for e in ev:
                if type(e).__name__ == "BlockStored" and e.medium == "GPU":
                    parent = e.parent_block_hash
                    for j, h in enumerate(e.block_hashes):
                        gpu[h] = (parent, e.token_ids[j * 16:(j + 1) * 16])
                        parent = h
            cpu = [e for e in ev if type(e).__name__ == "BlockStored" and e.medium == "CPU"]
            assert len(cpu) == 2, [type(e).__name__ + "/" + str(e.medium) for e in ev]
            for i, e in enumerate(cpu):
                assert e.block_hashes == [hashes[i]] and e.block_size == 16
                assert e.token_ids == list(P[16 * i:16 * (i + 1)])
                assert e.parent_block_hash == (hashes[i - 1] if i else None)
                if PREFIX_CACHING[0]:  # vLLM published its own blocks alike
                    assert gpu[hashes[i]] == (e.parent_block_hash, e.token_ids)
            assert eng.sc.reset_cache() is True
            gone = [e for e in events(eng)
                    if type(e).__name__ == "BlockRemoved" and e.medium == "CPU"]
            assert sorted(h for e in gone for h in e.block_hashes) == \
                sorted(h for e in cpu for h in e.block_hashes)
            drain(eng)
    finally:
        sub.close(0)
        ctx.term()


def test_kv_events_failure_turns_them_off_not_vllm(model_dir, tmp_path, caplog):
    """A KV-events failure (here: vLLM's request without block hashes)
    never reaches vLLM's scheduler: logged once, events off, the request
    served and hit as before."""
    with engine(model_dir, kv_events=f"ipc://{tmp_path}/kv") as eng:
        te = eng.sc._tier_events
        assert te is not None

        def broken(*a):
            raise AttributeError("'Request' object has no attribute 'block_hashes'")

        te.record_once = te.record = broken
        P = H.prompt(2)
        save(eng, "A", P)
        assert eng.sc._tier_events is None and list(eng.sc.take_events()) == []
        assert sum("KV events failed" in r.message for r in caplog.records) == 1
        eng.add("B", P)
        so, sched = eng.step()
        assert sched == {"B": 8}  # still a hit: 32 loaded
        drain(eng)


def test_consumer_waits_for_its_producers_writes(model_dir, redis_url, prefix_caching):
    """P/D: the consumer (kv_consumer) gets the request before its producer
    (kv_producer) has computed it: vLLM's scheduler is answered "ask again"
    (never blocked) while Redis lacks the prompt's whole chunks, Redis is
    asked again, and once the producer's writes land the request is
    scheduled with a load of them; the consumer saves nothing."""
    import time
    cfg = {"remote_url": redis_url}
    P = H.prompt(11 + 100 * prefix_caching)
    cons = engine(model_dir, dict(cfg, consumer_wait_ms="20000"), kv_role="kv_consumer")
    prod = engine(model_dir, cfg, kv_role="kv_producer")
    try:
        cons.add("C", P)
        t0 = time.monotonic()
        for _ in range(250):  # 0.5 s of passes: nothing scheduled, nothing blocks
            _, sched = cons.step()
            assert sched == {}, "scheduled before its producer wrote"
            time.sleep(0.002)
        assert time.monotonic() - t0 < 5
        save_to_redis(prod, "A", P)
        _, sched = step_until_scheduled(cons, tries=10000, pause=0.001)
        assert sched == {"C": 8}, "the consumer recomputed what its producer wrote"
        assert H.verify_loaded(cons, "C", 32)
        cons.run()
        cons.assert_empty()
        assert cons.wc.stats()["save_chunks"] == 0
        assert pins(cons) == 0
    finally:
        cons.close()
        prod.close()
