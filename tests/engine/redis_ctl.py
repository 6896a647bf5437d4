"""A real redis-server for the engine tests, controllable between phases:
the tests' fixture starts it (127.0.0.1, a free port, no persistence) and
engine_run.py phases stop, restart or slow it through this script, which
keeps the live server's PID in DIR/pid so that the fixture stops whichever
server runs at the end, by its PID.

  redis_ctl.py start DIR PORT     a server on PORT (empty), PID in DIR/pid
  redis_ctl.py stop DIR           SIGKILL the server in DIR/pid, wait for it
  redis_ctl.py sleep DIR PORT S   DEBUG SLEEP S sent without waiting: the
                                  server answers nothing for S seconds"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start(d: str, port: int) -> int:
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server is missing: ./configure installs it")
    os.makedirs(d, exist_ok=True)
    p = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                          "--appendonly", "no", "--dir", d, "--protected-mode", "yes",
                          "--enable-debug-command", "local"],  # DEBUG SLEEP
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # outlives the engine run that restarts it
    with open(os.path.join(d, "pid"), "w") as f:
        f.write(str(p.pid))
    t0 = time.time()
    while not ping(port):
        if p.poll() is not None or time.time() - t0 > 20:
            stop(d)
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    return p.pid


def stop(d: str) -> None:
    try:
        pid = int(open(os.path.join(d, "pid")).read())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    t0 = time.time()
    while time.time() - t0 < 10:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:  # not our child: wait until it is gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.05)
    os.unlink(os.path.join(d, "pid"))


def sleep(port: int, seconds: float) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
    time.sleep(0.2)  # read by now: the server stalls for `seconds`
    s.close()


if __name__ == "__main__":
    cmd, d = sys.argv[1], sys.argv[2]
    if cmd == "start":
        start(d, int(sys.argv[3]))
    elif cmd == "stop":
        stop(d)
    elif cmd == "sleep":
        sleep(int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit(f"redis_ctl.py: unknown command {cmd}")
