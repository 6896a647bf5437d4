"""pytest setup for kvrt's real-engine tests (vLLM's CPU engine, the
.venv-engine venv): the environment every engine process inherits, the
tiny model made once per session, and run(), which runs engine_run.py in a
subprocess and returns its JSON."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
       "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "KVRT_DEVICE": "host",
       "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def engine_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(ENV)
    # KVRT_TEST_SHIM: another checkout's connector/python (to show a test
    # fails on an older kvrt; KVRT_LIB then names its library)
    shim = env.get("KVRT_TEST_SHIM") or os.path.join(REPO, "connector", "python")
    env["PYTHONPATH"] = os.pathsep.join(
        [shim, HERE] +
        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    lib = os.path.join(REPO, "build", "plain", "libkvrt.so")
    if "KVRT_LIB" not in env and os.path.exists(lib):
        env["KVRT_LIB"] = lib
    env.update({k: str(v) for k, v in extra.items()})
    return env


def make_model(dtype: str) -> str:
    d = os.path.join(tempfile.gettempdir(), f"kvrt-engine-model-{os.getuid()}" +
                     ("" if dtype == "float32" else f"-{dtype}"))
    subprocess.run([sys.executable, os.path.join(HERE, "tiny_model.py"), d, dtype], check=True,
                   env=engine_env(), stdout=subprocess.DEVNULL)
    return d


@pytest.fixture(scope="session")
def model_dir():
    return make_model("float32")


@pytest.fixture(scope="session")
def model_bf16():
    return make_model("bfloat16")


@pytest.fixture
def redis_server():
    """A real redis-server on a free loopback port (redis_ctl.py: phases
    may stop, restart or slow it); stopped by its PID at the end, whichever
    server runs then. {"url", "port", "dir", "ctl": argv prefix}."""
    import shutil
    import redis_ctl
    d = tempfile.mkdtemp(prefix="kvrt-engine-redis-")
    port = redis_ctl.free_port()
    try:
        redis_ctl.start(d, port)
        yield {"url": f"redis://127.0.0.1:{port}", "port": port, "dir": d,
               "ctl": [sys.executable, os.path.join(HERE, "redis_ctl.py")]}
    finally:
        redis_ctl.stop(d)
        shutil.rmtree(d, ignore_errors=True)


def run(spec: dict, timeout=600, expect_fail=False, **env) -> dict:
    """engine_run.py over spec in a fresh process; its output JSON (with
    expect_fail: the run must fail; {"log": its output})."""
    with tempfile.TemporaryDirectory(prefix="kvrt-engine-") as d:
        sp, op, lp = (os.path.join(d, n) for n in ("spec.json", "out.json", "log.txt"))
        with open(sp, "w") as f:
            json.dump(spec, f)
        with open(lp, "w") as log:
            p = subprocess.run([sys.executable, os.path.join(HERE, "engine_run.py"), sp, op],
                               env=engine_env(**env), stdout=log, stderr=subprocess.STDOUT,
                               timeout=timeout)
        text = open(lp).read()
        if expect_fail:
            if not p.returncode:
                pytest.fail(f"engine run succeeded where it must fail:\n{text[-3000:]}")
            return {"log": text}
        if p.returncode or not os.path.exists(op):
            pytest.fail(f"engine run failed ({p.returncode}):\n{text[-6000:]}")
        out = json.load(open(op))
        out["log"] = text
        return out


# --- scenario helpers ---------------------------------------------------------

# The engine in this process (EngineCore and worker): start-up in seconds,
# vLLM's `uni` executor (kvrt's scheduler reads the worker's index
# directly). The default (unset) is vllm-cpu's multiprocess executor.
INPROC = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CHUNK = 256  # kvrt's default chunk_size
BLOCK = 128  # vllm-cpu's block size


def tokens(seed: int, n: int) -> list:
    import random
    r = random.Random(seed)
    return [r.randrange(10, 500) for _ in range(n)]


def expected_hit(n: int) -> int:
    """kvrt's hit for an n-token prompt saved before: its whole chunks (a
    partial last chunk is not saved by default), never the last token
    (vLLM computes at least one: a prompt ending on a chunk boundary loads
    all but its last token)."""
    return min(n // CHUNK * CHUNK, n - 1)


def same_tokens(got: list, want: list, what: str = "") -> None:
    """Generated ids per prompt identical (got, want: lists of id lists)."""
    assert len(got) == len(want), (len(got), len(want))
    bad = [i for i, (x, y) in enumerate(zip(got, want)) if x != y]
    assert not bad, f"{what}: generated tokens differ with kvrt for prompts {bad}"


def delta(r: dict, name: str, phase: int) -> float:
    """vLLM metric `vllm:<name>` gained during phase (cumulative metrics)."""
    m = r["metrics"]
    before = m[phase - 1].get("vllm:" + name, 0) if phase else 0
    return m[phase].get("vllm:" + name, 0) - before


def level(r: dict, name: str) -> float:
    return r["metrics"][-1].get("vllm:" + name, 0)


# Prompt sets. EDGE: shorter than a chunk, ending exactly on a chunk
# boundary, a document, one of max_model_len (2048 with its 4 tokens out).
EDGE = [tokens(1, 100), tokens(2, 512), tokens(3, 700), tokens(4, 2044)]
EDGE_HIT = sum(expected_hit(len(p)) for p in EDGE)  # 0 + 511 + 512 + 1792
# vLLM's CPU attention keeps its own block interior: kvrt copies whole
# blocks (README: "Whole blocks"), so a hit ending inside a block loads all
# of it (the 512-token prompt: 512 tokens for its hit of 511)
EDGE_LOADED = sum(-(-expected_hit(len(p)) // BLOCK) * BLOCK for p in EDGE)
CTRL = [tokens(10 + i, 600) for i in range(3)]   # negative controls, one at a time
DOCS = [tokens(100 + i, 640) for i in range(4)]  # 2 chunks each
DOCS_B = [tokens(200 + i, 640) for i in range(4)]
DOCS_HIT = sum(expected_hit(len(p)) for p in DOCS)
LLM_FP32 = {"enable_prefix_caching": True, "max_model_len": 2048, "dtype": "float32",
            "enforce_eager": True}
KVRT = {"device": "host", "max_local_cpu_size": 0.25}


def chat_prompt_ids(model: str, text_ids: list) -> tuple:
    """The chat request the server test sends, and the token ids vLLM's
    chat template makes of it (the same template and tokenizer)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": " ".join(f"t{i}" for i in text_ids)}]
    # as vLLM does: render the template, then tokenize without special tokens
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return messages, list(tok(text, add_special_tokens=False)["input_ids"])


CHAT_TEXT = tokens(300, 300)


@pytest.fixture(scope="session")
def baseline(model_dir, model_bf16):
    """Every prompt set's generated ids without kvrt (fp32 and bf16, TP 1),
    in one in-process engine per dtype."""
    _, chat_ids = chat_prompt_ids(model_dir, CHAT_TEXT)
    phases = [{"prompts": EDGE, "max_tokens": 4},
              {"prompts": CTRL, "max_tokens": 8, "sequential": True},
              {"prompts": DOCS, "max_tokens": 8},
              {"prompts": DOCS_B, "max_tokens": 8},
              {"prompts": [DOCS[0], chat_ids], "max_tokens": 8, "sequential": True}]
    out = run({"runs": [
        {"model": model_dir, "kvrt": None, "llm": LLM_FP32, "phases": phases},
        {"model": model_bf16, "kvrt": None, "llm": dict(LLM_FP32, dtype="bfloat16"),
         "phases": [{"prompts": EDGE, "max_tokens": 4}]}]}, **INPROC)
    fp32, bf16 = out["runs"]
    return {"edge": fp32["phases"][0], "ctrl": fp32["phases"][1], "docs": fp32["phases"][2],
            "docs_b": fp32["phases"][3], "server": fp32["phases"][4], "chat_ids": chat_ids,
            "edge_bf16": bf16["phases"][0]}
