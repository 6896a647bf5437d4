#!/bin/sh
# tests/check-lookup-socket.sh: a scheduler gets a worker's hit through the
# lookup socket (connector/lookup_socket.h) from another process, and no
# hit, quickly, once that worker is killed; a new worker replaces the dead
# one's stale socket; a preemption releases the lookup's pins on the worker. Runs build/plain/tests/lookup_socket_proc (and the
# ASan build when present) with XDG_RUNTIME_DIR in a temporary directory.
# Exit 0 pass, 1 fail.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
progs=""
for v in plain asan; do
	[ -x "build/$v/tests/lookup_socket_proc" ] && progs="$progs $top/build/$v/tests/lookup_socket_proc"
done
if [ -z "$progs" ]; then
	echo "FAIL: build/plain/tests/lookup_socket_proc not built (ninja build/plain/connector-tools)"
	exit 1
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvrt-check-lsock.XXXXXX") || exit 1
pid=""
cleanup() {
	[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
export XDG_RUNTIME_DIR="$tmp" KVRT_LOOKUP_SOCKET=1 KVRT_LOG_LEVEL=warn
export ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS="suppressions=$top/tests/lsan.supp"
fail=0

start_worker() { # prog instance
	rm -f "$tmp/ready"
	"$1" serve "$2" "$tmp/ready" "$tmp/pins" >"$tmp/serve.log" 2>&1 &
	pid=$!
	i=0
	while [ ! -e "$tmp/ready" ]; do
		i=$((i + 1))
		if [ $i -gt 300 ] || ! kill -0 "$pid" 2>/dev/null; then
			echo "FAIL: the worker did not come up"; cat "$tmp/serve.log"; return 1
		fi
		sleep 0.1
	done
}

kill_worker() {
	kill -9 "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	pid=""
}

for prog in $progs; do
	inst=inst-$$
	sock="$tmp/kvrt/$inst/rank0.sock"
	echo "== $prog"
	start_worker "$prog" "$inst" || { fail=1; continue; }
	mode=$(stat -c %a "$sock" 2>/dev/null)
	dmode=$(stat -c %a "$tmp/kvrt/$inst" 2>/dev/null)
	if [ "$mode" != 600 ] || [ "$dmode" != 700 ]; then
		echo "FAIL: socket mode '$mode' (want 600), directory '$dmode' (want 700)"; fail=1
	fi
	"$prog" lookup "$inst" 32 2000 || { echo "FAIL: no hit through the socket"; fail=1; }
	"$prog" preempt "$inst" "$tmp/pins" || { echo "FAIL: a preemption left the worker's pins"; fail=1; }
	kill_worker
	[ -S "$sock" ] || echo "note: the killed worker's socket is gone"
	"$prog" lookup "$inst" 0 1000 || { echo "FAIL: a dead worker did not answer no hit quickly"; fail=1; }
	start_worker "$prog" "$inst" || { fail=1; continue; }
	"$prog" lookup "$inst" 32 2000 || { echo "FAIL: the stale socket was not replaced"; fail=1; }
	kill_worker
done
[ $fail = 0 ] && echo "pass" || echo "FAIL"
exit $fail
