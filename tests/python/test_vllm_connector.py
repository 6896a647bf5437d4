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


def engine(model_dir, extra=None, **kw):
    cfg = dict(BASE)
    cfg.update(extra or {})
    return H.Engine(model_dir, extra=cfg, **kw)


def pins(eng):
    eng.wc.flush()
    return eng.wc.stats()["pinned"]


def test_hit_loads_identical_kv_and_schedules_tail(model_dir):
    eng = engine(model_dir)
    try:
        P = H.prompt(1)
        eng.add("A", P)
        eng.run()
        eng.wc.flush()
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
    finally:
        eng.close()


def test_cache_salt_isolates(model_dir):
    eng = engine(model_dir)
    try:
        P = H.prompt(2)
        eng.add("A", P, cache_salt="tenant-a")
        eng.run()
        eng.wc.flush()
        eng.add("B", P, cache_salt="tenant-b")
        so, sched = eng.step()
        assert sched == {"B": 40}
        eng.run()
        eng.add("C", P, cache_salt="tenant-a")
        so, sched = eng.step()
        assert sched == {"C": 8}
        assert H.verify_loaded(eng, "C", 32)
        eng.run()
        eng.assert_empty()
        assert pins(eng) == 0
    finally:
        eng.close()


def test_corrupt_chunk_is_recomputed(model_dir):
    eng = engine(model_dir)
    try:
        P = H.prompt(3)
        eng.add("A", P)
        eng.run()
        eng.wc.flush()
        b = eng.add("B", P)
        assert eng.sc.debug_corrupt_chunk(b, 1) == 0
        so, s1 = eng.step()
        so, s2 = eng.step()
        assert s1 == {"B": 8}
        assert s2 == {"B": 24}  # truncated to the bad block, 16..39 recomputed
        assert eng.wc.stats()["checksum_failures"] == 1
        eng.run()
        eng.assert_empty()
        assert pins(eng) == 0
    finally:
        eng.close()


def test_preemption_resume_no_leaks(model_dir):
    eng = engine(model_dir, num_blocks=9)
    seen = []
    orig = eng.sc.get_num_new_matched_tokens

    def spy(req, n):
        out = orig(req, n)
        seen.append((req.request_id, n, out))
        return out

    eng.sc.get_num_new_matched_tokens = spy
    try:
        eng.add("A", H.prompt(4), max_tokens=40)
        eng.add("B", H.prompt(5), max_tokens=40)
        eng.run(max_steps=300)
        assert any(o[0] > 0 for _, _, o in seen), "the resumed request hit kvrt"
        eng.assert_empty()
        assert pins(eng) == 0
    finally:
        eng.close()


def test_delay_free_released(model_dir):
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
        eng.assert_empty()  # blocks came back through finished_sending
        assert pins(eng) == 0
    finally:
        eng.close()


def test_abort_during_async_load_no_leaks(model_dir):
    eng = engine(model_dir, extra={"enable_async_loading": "true"})
    try:
        from vllm.v1.request import RequestStatus
        P = H.prompt(7)
        eng.add("A", P)
        eng.run()
        eng.wc.flush()
        eng.add("D", P)
        so, sched = eng.step()
        assert sched == {}
        eng.sched.finish_requests("D", RequestStatus.FINISHED_ABORTED)
        eng.run()
        for _ in range(3):
            eng.step()
        eng.assert_empty()
        assert pins(eng) == 0
    finally:
        eng.close()


def test_async_load_from_disk(model_dir):
    d = tempfile.mkdtemp(prefix="kvrt-disk-")
    # A CPU pool of a few chunks: earlier prompts are demoted to disk.
    eng = engine(model_dir, extra={"enable_async_loading": "true", "local_disk": d,
                                   "max_local_disk_size": "0.05",
                                   "max_local_cpu_size": str(8 * 8192 / 2**30)})
    try:
        P = H.prompt(8)
        eng.add("A", P)
        eng.run()
        for i in range(6):
            eng.add(f"F{i}", H.prompt(20 + i))
            eng.run()
        eng.wc.flush()
        eng.add("B", P)
        so, sched = eng.step()
        assert sched == {}
        assert eng.sched.requests["B"].status.name == "WAITING_FOR_REMOTE_KVS"
        assert eng.wc.stats()["prefetches"] > 0  # A's chunks came from disk
        for _ in range(200):
            so, sched = eng.step()
            if sched:
                break
        assert sched == {"B": 8}
        assert H.verify_loaded(eng, "B", 32)
        eng.run()
        eng.assert_empty()
        assert pins(eng) == 0
    finally:
        eng.close()
        shutil.rmtree(d, ignore_errors=True)
