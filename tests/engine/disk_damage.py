"""Damage kvrt's disk tier under a running engine (tests/engine/test_faults.py):
disk_damage.py DIR: of the chunk files (DIR/xx/<key>.kvc), flips bytes
in the payload of the first, truncates the second to half, deletes the
third; fails when fewer than three are there."""

import glob
import os
import sys

files = sorted(glob.glob(os.path.join(sys.argv[1], "*", "*.kvc")))
if len(files) < 3:
    sys.exit(f"disk_damage.py: {len(files)} chunk files in {sys.argv[1]}, need 3")
with open(files[0], "r+b") as f:
    f.seek(4096)
    b = f.read(64)
    f.seek(4096)
    f.write(bytes(x ^ 0xFF for x in b))
os.truncate(files[1], os.path.getsize(files[1]) // 2)
os.unlink(files[2])
print(f"damaged 3 of {len(files)} chunk files")
