"""Runs of vLLM's real offline engine (LLM) over phases of prompts, with or
without kvrt, one after the other in this process:
engine_run.py SPEC.json OUT.json.

SPEC: {"runs": [RUN, ...]} or one RUN;
RUN:  {"model": dir, "kvrt": null | {extra config}, "llm": {LLM kwargs},
       "kv_role": "kv_both" (default) | "kv_producer" | "kv_consumer",
       "kv_events": bool  (vLLM publishes KV events over ZMQ, a subscriber here
                           keeps each phase's: OUT's "events"),
       "env": {name: value, ...}  (set while this run's engine starts and runs:
                                   KVRT_DEBUG, ...; the workers inherit it),
       "phases": [PHASE, ...]}
PHASE: {"prompts": [[token ids]...], "max_tokens": n,
        "reset_local": bool   (reset vLLM's prefix cache first, right after
                               the last phase's outputs),
        "reset_kvrt": bool    (reset vLLM's prefix cache and kvrt's cache
                               first: reset_prefix_cache(reset_connector)),
        "sequential": bool    (one generate() per prompt: one request at a time),
        "salt": str           (every prompt's cache_salt: a tenant),
        "before": [[argv]...] (commands run before the phase: faults, e.g.
                               redis_ctl.py stop / start / sleep),
        "abort": {"ids": [i...], "after_steps": k}
                              (the engine API: add every prompt, step k times,
                               abort those prompts, step to the end; aborted
                               prompts give [])}
OUT:  {"runs": [{"phases": [[[generated ids] per prompt] per phase],
                 "metrics": [{name: value} after each phase],
                 "resets": [bool per reset_local],
                 "events": [[event dicts: "type", "block_hashes",
                             "parent_block_hash", "token_ids", "block_size",
                             "medium", "locality"] per phase] (kv_events),
                 "end": {"pins": kvrt's pins once loads in flight ended
                                 (runs with kvrt),
                         "used_blocks": n (in-process engines only)}}, ...]}
Greedy (temperature 0), seed 0, ignore_eos: the generated ids depend on
the prompt and on the KV the model reads, nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def metrics(llm) -> dict:
    out: dict = {}
    try:
        for m in llm.get_metrics():
            v = getattr(m, "value", None)
            if isinstance(v, (int, float)):
                out[m.name] = out.get(m.name, 0) + v
    except Exception as e:  # noqa: BLE001  (metrics are a bonus, tokens the proof)
        out["error"] = repr(e)
    return out


def scheduler_of(llm):
    """vLLM's scheduler when the engine core runs in this process, else None."""
    core = getattr(llm.llm_engine, "engine_core", None)
    core = getattr(core, "engine_core", None)
    return getattr(core, "scheduler", None)


def step_once(llm, SamplingParams, token: int) -> None:
    """An engine step that stores and hits nothing (a 3-token request, one
    token out): what a worker did since its last step is reported with it."""
    sp = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    llm.generate([{"prompt_token_ids": [token] * 3}], sp, use_tqdm=False)


def settled_pins(llm, SamplingParams) -> float:
    """kvrt's pins once loads still in flight after the last phase ended
    (an aborted request's async load runs on) have finished: the gauge is
    reported with a step, so one-token requests that hit nothing make
    steps, 5 s at most. A pin that outlives them is a leak."""
    for i in range(50):
        pins = metrics(llm).get("vllm:kvrt_pins", 0)
        if not pins:
            return 0
        time.sleep(0.1)
        step_once(llm, SamplingParams, 11 + i)
    return metrics(llm).get("vllm:kvrt_pins", 0)


class Subscriber:
    """vLLM's KV events, as a router receives them: a ZMQ SUB socket on the
    publisher's ipc endpoint, decoded with vLLM's own KVEventBatch."""

    def __init__(self, endpoint: str):
        import threading
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.dec = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.got: list = []
        self.lock = threading.Lock()
        self.stop = False
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        import zmq
        while not self.stop:
            if not self.sock.poll(100):
                continue
            parts = self.sock.recv_multipart()
            batch = self.dec.decode(parts[-1])
            with self.lock:
                self.got += [event_dict(e) for e in batch.events]

    def take(self) -> list:
        with self.lock:
            out, self.got = self.got, []
        return out

    def close(self):
        self.stop = True
        self.t.join()
        self.sock.close(0)
        self.ctx.term()


def event_dict(e) -> dict:
    d = {"type": type(e).__name__}
    for f in ("block_hashes", "parent_block_hash", "token_ids", "block_size", "medium",
              "locality"):
        if hasattr(e, f):
            v = getattr(e, f)
            d[f] = list(v) if isinstance(v, (list, tuple)) else v
    return d


def phase_events(llm, sub, SamplingParams) -> list:
    """The phase's events, with those of saves still finishing: one-token
    requests that store nothing make steps (a worker's events reach the
    publisher with a step) until a second passes with none."""
    got, quiet = [], 0
    for i in range(40):
        time.sleep(0.25)
        new = sub.take()
        got += new
        quiet = 0 if new else quiet + 1
        if quiet >= 4:
            break
        step_once(llm, SamplingParams, 7 + i)
    return got


def run_aborts(llm, ph, sp) -> list:
    eng = llm.llm_engine
    ids = [f"abort-{os.getpid()}-{i}-{id(ph)}" for i in range(len(ph["prompts"]))]
    for rid, p in zip(ids, ph["prompts"]):
        eng.add_request(rid, {"prompt_token_ids": p}, sp)
    done: dict = {}
    for _ in range(ph["abort"].get("after_steps", 1)):
        for o in eng.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
    gone = [ids[i] for i in ph["abort"]["ids"]]
    eng.abort_request(gone)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
    return [[] if rid in gone else done.get(rid, []) for rid in ids]


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    saved = {k: os.environ.get(k) for k in spec.get("env", {})}
    os.environ.update({k: str(v) for k, v in spec.get("env", {}).items()})
    try:
        return run_engine(spec, LLM, SamplingParams)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_engine(spec, LLM, SamplingParams) -> dict:
    kw = dict(model=spec["model"], seed=0, disable_log_stats=False)
    kw.update(spec.get("llm") or {})
    if spec.get("kvrt") is not None:
        from vllm.config import KVTransferConfig
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvrtConnectorV1", kv_connector_module_path="kvrt.vllm",
            kv_role=spec.get("kv_role", "kv_both"), kv_load_failure_policy="recompute",
            kv_connector_extra_config=dict(spec["kvrt"]))
    sub = None
    if spec.get("kv_events"):
        import tempfile
        from vllm.config import KVEventsConfig
        ep = "ipc://" + os.path.join(tempfile.mkdtemp(prefix="kvrt-events-"), "pub")
        kw["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                endpoint=ep, topic="kv")
    llm = LLM(**kw)
    out: dict = {"phases": [], "metrics": []}
    if spec.get("kv_events"):
        sub = Subscriber(kw["kv_events_config"].endpoint)
        time.sleep(0.5)  # connected before the first event (ZMQ drops earlier ones)
        out["events"] = []
    for ph in spec["phases"]:
        for argv in ph.get("before", ()):
            subprocess.run(argv, check=True)
        if ph.get("reset_kvrt"):
            out.setdefault("resets", []).append(
                bool(llm.reset_prefix_cache(reset_connector=True)))
        if ph.get("reset_local"):
            # vLLM's own prefix cache only, right after the last phase's
            # outputs (no engine step in between): kvrt frees a finished
            # request's blocks at once when its saves are done.
            out.setdefault("resets", []).append(bool(llm.reset_prefix_cache()))
        sp = SamplingParams(temperature=0.0, max_tokens=ph.get("max_tokens", 8),
                            ignore_eos=True, detokenize=False)
        if ph.get("abort"):
            out["phases"].append(run_aborts(llm, ph, sp))
        else:
            groups = [[p] for p in ph["prompts"]] if ph.get("sequential") else [ph["prompts"]]
            got = []
            for g in groups:
                salt = {"cache_salt": ph["salt"]} if ph.get("salt") else {}
                res = llm.generate([dict(prompt_token_ids=p, **salt) for p in g], sp,
                                   use_tqdm=False)
                got += [list(r.outputs[0].token_ids) for r in res]
            out["phases"].append(got)
        if sub is not None:
            out["events"].append(phase_events(llm, sub, SamplingParams))
        out["metrics"].append(metrics(llm))
    if sub is not None:
        sub.close()
    out["end"] = {}
    if spec.get("kvrt") is not None:
        out["end"]["pins"] = settled_pins(llm, SamplingParams)
    sched = scheduler_of(llm)
    if sched is not None:
        # Blocks still held by requests (a finished one whose saves were
        # still copying may hold its own until the next step: one step).
        if sched.has_requests():
            llm.llm_engine.step()
        pool = sched.kv_cache_manager.block_pool
        out["end"]["used_blocks"] = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    del llm
    import gc
    gc.collect()
    return out


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    runs = spec["runs"] if "runs" in spec else [spec]
    json.dump({"runs": [run(r) for r in runs]}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
