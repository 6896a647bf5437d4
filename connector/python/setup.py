"""Build hook of connector/python/pyproject.toml: put libkvrt.so in the package."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
TARGET = "build/plain/libkvrt.so.0.1.0"


def _library() -> str:
    src = os.environ.get("KVRT_LIB_SRC")
    if src:
        return src
    if not os.path.exists(os.path.join(REPO, "build.ninja")):
        raise RuntimeError(f"kvrt: {REPO} is not the kvrt repo (no build.ninja); "
                           "set KVRT_LIB_SRC to a built libkvrt.so")
    path = os.path.join(REPO, TARGET)
    # ninja does nothing when the library is up to date.
    if shutil.which("ninja"):
        subprocess.run(["ninja", TARGET], cwd=REPO, check=True)
    elif not os.path.exists(path):
        raise RuntimeError("kvrt: ninja not found and " + path + " not built")
    return path


class BuildWithLib(build_py):
    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "kvrt", "libkvrt.so")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(_library(), dst)


setup(cmdclass={"build_py": BuildWithLib})
