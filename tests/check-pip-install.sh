#!/bin/sh
# tests/check-pip-install.sh: `pip install ./connector/python` bundles
# libkvrt.so into the kvrt package, and kvrt._lib loads that copy (not the
# repo's build folder). Installs with $KVRT_PYTHON (else ./configure's .venv,
# else python3) into a
# throwaway --target folder with that python's own setuptools; nothing
# downloaded (--no-index --no-build-isolation --no-deps). 77 = skipped (no
# pip, or no setuptools able to build a wheel).
set -u
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${KVRT_PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=$repo/.venv/bin/python   # ./configure's venv
[ -z "$PY" ] && PY=python3
"$PY" -c "import setuptools, pip" 2>/dev/null || { echo "skip: $PY has no pip/setuptools"; exit 77; }
"$PY" -c "import setuptools.command.bdist_wheel" 2>/dev/null || "$PY" -c "import wheel" 2>/dev/null ||
	{ echo "skip: $PY's setuptools cannot build wheels (no 'wheel')"; exit 77; }
tmp=$(mktemp -d /tmp/kvrt-pip-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
ninja build/plain/libkvrt.so.0.1.0 >"$tmp/log" 2>&1 || { cat "$tmp/log"; echo "FAIL: ninja"; exit 1; }
cp -r connector/python "$tmp/src"   # build in a copy: nothing left in the repo
KVRT_LIB_SRC=$repo/build/plain/libkvrt.so.0.1.0 "$PY" -m pip install -q --target "$tmp/site" \
	--no-deps --no-build-isolation --no-index "$tmp/src" >"$tmp/log" 2>&1 ||
	{ cat "$tmp/log"; echo "FAIL: pip install"; exit 1; }
cd "$tmp"
env -u KVRT_LIB PYTHONPATH="$tmp/site" "$PY" - <<'X' || { echo "FAIL: import"; exit 1; }
import os, kvrt, kvrt._lib as L
here = os.path.dirname(kvrt.__file__)
assert here.startswith(os.environ["PYTHONPATH"]), here
lib = L.lib()
assert lib._name == os.path.join(here, "libkvrt.so"), lib._name
assert L.candidates()[0] == lib._name, L.candidates()
print("ok: kvrt._lib loaded", lib._name)
X
