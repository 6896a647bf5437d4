"""kvrt in vLLM's real offline engine (LLM), the engine in the test's
driver process (vLLM's `uni` executor: one start costs seconds, so every
scenario below shares one driver process, an engine each). Each scenario's
generated ids are compared with the same prompts run without kvrt
(conftest's `baseline`), greedy, same seed.

- hits: repeated prompts hit kvrt, with vLLM's prefix caching on (its cache
  reset in between) and off, fp32 and bf16; prompts shorter than a chunk,
  ending exactly on a chunk boundary, and of max_model_len; kvrt's counters
  and vLLM's external prefix-cache counters agree;
- negative controls: vLLM's paged KV zeroed right before each loading step
  leaves the tokens unchanged (kvrt wrote every block the model reads);
  what kvrt loads overwritten (the checksum bypassed) changes them (the
  model reads what kvrt wrote);
- async loading from the disk tier (WAITING_FOR_REMOTE_KVS), and requests
  aborted while they load: every vLLM block free at the end, no pins;
- a corrupt chunk (vLLM's multiprocess executor): recovered, tokens
  identical, dropped, and the next identical request hits."""

import shutil
import tempfile

import pytest

from conftest import (CTRL, DOCS, DOCS_B, DOCS_HIT, EDGE, EDGE_HIT, EDGE_LOADED, INPROC, KVRT,
                      LLM_FP32, delta, expected_hit, level, run, same_tokens, tokens)

DEBUG = "KVRT_DEBUG"
PRE_Q = [tokens(200 + i, 60) for i in range(4)]
PRE_Q2 = [tokens(300 + i, 60) for i in range(4)]


def edge_phases():
    # vLLM forgets its own cache before the repeat: the hits are kvrt's
    return [{"prompts": EDGE, "max_tokens": 4},
            {"prompts": EDGE, "max_tokens": 4, "reset_local": True}]


def ctrl_phases():
    # one request at a time: a loading step reads only its own blocks
    return [{"prompts": CTRL, "max_tokens": 8, "sequential": True},
            {"prompts": CTRL, "max_tokens": 8, "sequential": True}]


@pytest.fixture(scope="module")
def offline(model_dir, model_bf16, baseline):
    disk = tempfile.mkdtemp(prefix="kvrt-engine-disk-")
    pc_off = dict(LLM_FP32, enable_prefix_caching=False)
    # A CPU tier of 12 slabs (1 MiB chunks) under 16 chunks of documents:
    # the first documents go to disk and come back asynchronously.
    async_kvrt = dict(KVRT, max_local_cpu_size=0.012, enable_async_loading=True,
                      local_disk=disk, max_local_disk_size=1)
    runs = {
        "pc_on": {"model": model_dir, "kvrt": KVRT, "llm": LLM_FP32, "phases": edge_phases()},
        "pc_off": {"model": model_dir, "kvrt": KVRT, "llm": pc_off, "phases": edge_phases()},
        "bf16": {"model": model_bf16, "kvrt": KVRT, "llm": dict(LLM_FP32, dtype="bfloat16"),
                 "phases": edge_phases()},
        # save_unfull_chunk asks for the prompts' tails too: on vLLM's CPU
        # attention kvrt copies whole blocks only, so tails are not saved
        "unfull": {"model": model_dir, "kvrt": dict(KVRT, save_unfull_chunk=True), "llm": pc_off,
                   "phases": edge_phases()},
        "zero": {"model": model_dir, "kvrt": KVRT, "llm": pc_off, "phases": ctrl_phases(),
                 "env": {DEBUG: "zero_kv_before_load"}},
        "perturb": {"model": model_dir, "kvrt": KVRT, "llm": pc_off, "phases": ctrl_phases(),
                    "env": {DEBUG: "perturb_loads"}},
        "async": {"model": model_dir, "kvrt": async_kvrt, "llm": LLM_FP32, "phases": [
            {"prompts": DOCS, "max_tokens": 8},
            {"prompts": DOCS_B, "max_tokens": 8},
            {"prompts": DOCS, "max_tokens": 8, "reset_local": True},
            {"prompts": DOCS_B, "max_tokens": 8, "reset_local": True,
             "abort": {"ids": [0, 2], "after_steps": 1}}]},
    }
    # Preemption: a pool of 16 blocks for 4 documents of 6 blocks each,
    # vLLM's cache holding the first 3 blocks of each (a load starting mid-
    # chunk), generating 200 tokens: preempted requests resume from local
    # hits plus kvrt. Without kvrt and with it (the tokens to compare).
    pre = {"model": model_dir, "llm": dict(LLM_FP32, num_gpu_blocks_override=16,
                                           max_model_len=1024),
           "phases": [{"prompts": [d + q for d, q in zip(DOCS, PRE_Q)], "max_tokens": 8},
                      {"prompts": [d[:400] for d in DOCS], "max_tokens": 4, "reset_local": True},
                      {"prompts": [d + q for d, q in zip(DOCS, PRE_Q2)], "max_tokens": 200}]}
    runs["preempt_base"] = dict(pre, kvrt=None)
    runs["preempt"] = dict(pre, kvrt=KVRT)
    try:
        out = run({"runs": list(runs.values())}, timeout=900, **INPROC)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    res = dict(zip(runs, out["runs"]))
    res["log"] = out["log"]
    return res


def no_leaks(r):
    assert r["end"]["used_blocks"] == 0, f"{r['end']['used_blocks']} vLLM blocks still used"
    assert r["end"]["pins"] == 0, f"{r['end']['pins']} kvrt pins still held"


@pytest.mark.parametrize("name", ["pc_on", "pc_off", "bf16", "unfull"])
def test_repeated_prompts_hit_tokens_identical(offline, baseline, name):
    r = offline[name]
    want = baseline["edge_bf16" if name == "bf16" else "edge"]
    same_tokens(r["phases"][0], want, f"{name} first")
    same_tokens(r["phases"][1], want, f"{name} repeat")
    if r is not offline["pc_off"] and r is not offline["unfull"]:
        assert r["resets"] == [True], "reset_prefix_cache right after generate failed"
    # kvrt hit every saved chunk, up to each prompt's last token (a
    # 100-token prompt: none; 512: 511; 700: 512; 2044: 1792), and vLLM
    # counted exactly those as external prefix-cache hits
    assert delta(r, "kvrt_hit_tokens", 0) == 0
    assert delta(r, "kvrt_hit_tokens", 1) == EDGE_HIT
    assert delta(r, "external_prefix_cache_hits", 1) == EDGE_HIT
    assert delta(r, "kvrt_loaded_tokens", 1) == EDGE_LOADED
    assert delta(r, "kvrt_saved_chunks", 0) == sum(len(p) // 256 for p in EDGE)
    assert level(r, "kvrt_load_errors") == 0
    no_leaks(r)


def test_zeroed_paged_kv_before_loads_changes_nothing(offline, baseline):
    """Every block the model reads in a loading step was written by kvrt
    (or computed by that step): zeroing all of vLLM's KV first changes no
    token."""
    r = offline["zero"]
    assert delta(r, "kvrt_loaded_tokens", 1) == sum(expected_hit(len(p)) for p in CTRL)
    same_tokens(r["phases"][0], baseline["ctrl"], "saves")
    same_tokens(r["phases"][1], baseline["ctrl"], "loads into zeroed KV")
    assert "test hook 'zero_kv_before_load' on" in offline["log"]


def test_perturbed_loads_change_tokens(offline, baseline):
    """The model reads what kvrt loads: overwritten chunks (served past the
    checksum by a test hook) give other tokens."""
    r = offline["perturb"]
    same_tokens(r["phases"][0], baseline["ctrl"], "nothing loaded yet")
    assert delta(r, "kvrt_loaded_tokens", 1) == sum(expected_hit(len(p)) for p in CTRL)
    changed = [i for i, (x, y) in enumerate(zip(r["phases"][1], baseline["ctrl"])) if x != y]
    assert changed, "perturbed KV gave the same tokens: the tests could not see wrong KV"


def test_async_loads_from_disk_and_aborts(offline, baseline):
    r = offline["async"]
    same_tokens(r["phases"][0], baseline["docs"], "first documents")
    same_tokens(r["phases"][1], baseline["docs_b"], "second documents")
    assert level(r, "kvrt_demoted_to_disk") > 0, "nothing went to disk: the scenario lost its point"
    # the first documents again, from disk through WAITING_FOR_REMOTE_KVS
    same_tokens(r["phases"][2], baseline["docs"], "async loads from disk")
    assert delta(r, "kvrt_hit_tokens", 2) == DOCS_HIT
    assert delta(r, "kvrt_loaded_tokens", 2) == DOCS_HIT
    assert delta(r, "kvrt_promoted_from_disk", 2) > 0
    # two of the second documents aborted one step into their loads; the
    # others complete with the right tokens
    got = r["phases"][3]
    assert got[0] == [] and got[2] == []
    same_tokens([got[1], got[3]], [baseline["docs_b"][1], baseline["docs_b"][3]], "after aborts")
    assert level(r, "kvrt_load_errors") == 0
    assert r["resets"] == [True, True]
    no_leaks(r)


def test_preemptions_resume_from_local_and_kvrt_no_leaks(offline):
    """(The same scenario runs under the multiprocess executor in
    test_engine.py; here the engine's block pool can be read.)"""
    a, b = offline["preempt_base"], offline["preempt"]
    for i in range(3):
        same_tokens(b["phases"][i], a["phases"][i], f"phase {i}")
    assert level(b, "num_preemptions") > 0, "no preemption: the scenario lost its point"
    assert delta(b, "prefix_cache_hits", 2) > 0, "no local hits: the scenario lost its point"
    assert delta(b, "kvrt_loaded_tokens", 2) >= 4 * 128
    assert level(b, "kvrt_load_errors") == 0
    assert b["resets"] == [True]
    no_leaks(b)


def test_corrupt_chunk_recovered_dropped_then_hits(model_dir, baseline):
    """vLLM's multiprocess executor (worker in its own process). The first
    chunk loaded is corrupted in kvrt's CPU pool (test hook): its load
    fails the checksum, vLLM recomputes ("Recovered from KV load failure"),
    tokens identical; the chunk was dropped and the recompute saved again:
    the next identical requests hit everything, with no second failure."""
    phases = [{"prompts": DOCS, "max_tokens": 8},
              {"prompts": DOCS, "max_tokens": 8, "reset_local": True},
              {"prompts": DOCS, "max_tokens": 8, "reset_local": True}]
    out = run({"model": model_dir, "kvrt": KVRT, "llm": LLM_FP32, "phases": phases,
               "env": {DEBUG: "corrupt_loads=1"}})
    r = out["runs"][0]
    for i in range(3):
        same_tokens(r["phases"][i], baseline["docs"], f"phase {i}")
    assert delta(r, "kvrt_checksum_failures", 1) == 1
    assert delta(r, "kvrt_load_errors", 1) == 1
    assert "Recovered from KV load failure" in out["log"]
    assert delta(r, "kvrt_checksum_failures", 2) == 0, "the corrupt chunk was served again"
    assert delta(r, "kvrt_load_errors", 2) == 0
    assert delta(r, "kvrt_loaded_tokens", 2) == DOCS_HIT
    assert delta(r, "external_prefix_cache_hits", 2) == DOCS_HIT
    assert level(r, "kvrt_pins") == 0
