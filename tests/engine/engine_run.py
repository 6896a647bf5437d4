"""Runs of vLLM's real offline engine (LLM) over phases of prompts, with or
without kvrt, one after the other in this process:
engine_run.py SPEC.json OUT.json.

SPEC: {"runs": [RUN, ...]} or one RUN;
RUN:  {"model": dir, "kvrt": null | {extra config}, "llm": {LLM kwargs},
       "phases": [{"prompts": [[token ids]...], "max_tokens": n,
                   "reset_local": bool}]}
OUT:  {"runs": [{"phases": [[[generated ids] per prompt] per phase],
                 "metrics": [{name: value} after each phase]}, ...]}
Greedy (temperature 0), seed 0, ignore_eos: the generated ids depend on
the prompt and on the KV the model reads, nothing else."""

from __future__ import annotations

import json
import sys


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


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    kw = dict(model=spec["model"], seed=0, disable_log_stats=False)
    kw.update(spec.get("llm") or {})
    if spec.get("kvrt") is not None:
        from vllm.config import KVTransferConfig
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvrtConnectorV1", kv_connector_module_path="kvrt.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config=dict(spec["kvrt"]))
    llm = LLM(**kw)
    out: dict = {"phases": [], "metrics": []}
    for ph in spec["phases"]:
        if ph.get("reset_local"):
            # vLLM's own prefix cache only, right after the last phase's
            # outputs (no engine step in between): kvrt frees a finished
            # request's blocks at once when its saves are done.
            out.setdefault("resets", []).append(bool(llm.reset_prefix_cache()))
        sp = SamplingParams(temperature=0.0, max_tokens=ph.get("max_tokens", 8),
                            ignore_eos=True, detokenize=False)
        res = llm.generate([{"prompt_token_ids": p} for p in ph["prompts"]], sp, use_tqdm=False)
        out["phases"].append([list(r.outputs[0].token_ids) for r in res])
        out["metrics"].append(metrics(llm))
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
