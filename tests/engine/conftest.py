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


@pytest.fixture(scope="session")
def model_dir():
    d = os.path.join(tempfile.gettempdir(), f"kvrt-engine-model-{os.getuid()}")
    subprocess.run([sys.executable, os.path.join(HERE, "tiny_model.py"), d], check=True,
                   env=engine_env(), stdout=subprocess.DEVNULL)
    return d


def run(spec: dict, timeout=600, **env) -> dict:
    """engine_run.py over spec in a fresh process; its output JSON."""
    with tempfile.TemporaryDirectory(prefix="kvrt-engine-") as d:
        sp, op, lp = (os.path.join(d, n) for n in ("spec.json", "out.json", "log.txt"))
        with open(sp, "w") as f:
            json.dump(spec, f)
        with open(lp, "w") as log:
            p = subprocess.run([sys.executable, os.path.join(HERE, "engine_run.py"), sp, op],
                               env=engine_env(**env), stdout=log, stderr=subprocess.STDOUT,
                               timeout=timeout)
        text = open(lp).read()
        if p.returncode or not os.path.exists(op):
            pytest.fail(f"engine run failed ({p.returncode}):\n{text[-6000:]}")
        out = json.load(open(op))
        out["log"] = text
        return out
