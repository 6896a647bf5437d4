#!/bin/sh
# tests/check-remote.sh: the remote tier (actors/remote.c) against real Redis.
#
# Starts, on loopback and free ports, one standalone redis-server and a
# 3-master Redis Cluster (redis-cli --cluster create), then runs
# build/plain/tests/remote_test (and build/asan/tests/remote_test when built):
#   basic        round trips, exists, misses, corrupt values, queue full, TTL,
#                db, AUTH refused, URL errors, unreachable server
#   put / get    two engines in two processes see each other's chunks
#                (standalone and cluster)
#   faults       kill -9 mid-write and mid-read, restart empty, DEBUG SLEEP
#                past the timeout (the program spawns its own server)
#   cluster      routing over every master, ASK and MOVED after migrating a
#                slot, a master going away (last: it breaks the cluster)
#   engines      build/*/tests/remote_engine: two engines in two processes
#                through the standalone server (write-behind, lookup
#                prefetch, async load, bitwise check), a dead server, and
#                corrupted values (a miss or load errors, never wrong bytes)
# Every server started here (or by remote_test, through its pid file) is
# stopped on every exit path. Exit 0 pass, 1 fail, 77 skip (no redis-server).
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1

server=$(command -v redis-server 2>/dev/null || true)
cli=$(command -v redis-cli 2>/dev/null || true)
if [ -z "$server" ] || [ -z "$cli" ]; then
	echo "skip: redis-server / redis-cli not installed (./configure installs redis-server)"
	exit 77
fi
prog=$top/build/plain/tests/remote_test
if [ ! -x "$prog" ]; then
	echo "FAIL: $prog not built (ninja build/plain/remote-tools)"
	exit 1
fi
progs=$prog
[ -x "$top/build/asan/tests/remote_test" ] && progs="$progs $top/build/asan/tests/remote_test"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvrt-check-remote.XXXXXX") || exit 1
# Servers started here are recorded in $tmp/pids (start_server runs in a
# command substitution: a subshell, so no shell variable); those remote_test
# spawns write pid files. Both are killed on every exit path.
cleanup() {
	[ -f "$tmp/pids" ] && for p in $(cat "$tmp/pids"); do kill -9 "$p" 2>/dev/null; done
	for f in "$tmp"/*/*.pid; do
		[ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null
	done
	sleep 0.1
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

fail=0
bad() { echo "FAIL: $*"; fail=1; }

# A free-looking port: random in 20000..59999, not answering PING.
pick_port() {
	while :; do
		p=$(( (($$ * 7919) + $(od -An -N2 -tu2 /dev/urandom)) % 40000 + 20000 ))
		"$cli" -p "$p" ping >/dev/null 2>&1 || { echo "$p"; return; }
	done
}

# start_server NAME [extra args...]: starts redis-server on a free port in
# $tmp/NAME; prints the port. Retries on a port taken in between.
start_server() {
	name=$1; shift
	mkdir -p "$tmp/$name"
	for try in 1 2 3 4 5; do
		port=$(pick_port)
		"$server" --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
			--daemonize no --enable-debug-command yes --dir "$tmp/$name" \
			--logfile "$tmp/$name/redis.log" --pidfile "$tmp/$name/redis.pid" "$@" \
			</dev/null >/dev/null 2>&1 &
		pid=$!
		i=0
		while [ $i -lt 100 ]; do
			if "$cli" -p "$port" ping 2>/dev/null | grep -q PONG; then
				echo "$pid" >>"$tmp/pids"
				echo "$port"
				return 0
			fi
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.05; i=$((i + 1))
		done
		kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	done
	return 1
}

# --- standalone ------------------------------------------------------------------
p1=$(start_server standalone) || { echo "FAIL: cannot start redis-server"; exit 1; }
echo "redis-server on 127.0.0.1:$p1"

for bin in $progs; do
	v=$(basename "$(dirname "$(dirname "$bin")")")
	echo "== $v basic"
	KVRT_TEST_REDIS=127.0.0.1:$p1 timeout 60 "$bin" basic || bad "$v basic"
	echo "== $v two processes (standalone)"
	timeout 30 "$bin" put "redis://127.0.0.1:$p1" 42 24 || bad "$v put"
	timeout 30 "$bin" get "redis://127.0.0.1:$p1" 42 24 || bad "$v get"
	echo "== $v faults"
	fp=$(pick_port)
	mkdir -p "$tmp/faults-$v"
	KVRT_TEST_REDIS_SERVER=$server KVRT_TEST_FAULT_PORT=$fp KVRT_TEST_DIR=$tmp/faults-$v \
		timeout 60 "$bin" faults || bad "$v faults"
	"$cli" -p "$p1" flushall >/dev/null 2>&1
done

# --- cluster -------------------------------------------------------------------------
# Run per variant on a fresh cluster: the cluster scenario ends by stopping
# a master.
for bin in $progs; do
	v=$(basename "$(dirname "$(dirname "$bin")")")
	seeds=""
	ok=1
	for n in 1 2 3; do
		cp=$(start_server "cluster-$v-$n" --cluster-enabled yes \
			--cluster-config-file nodes.conf --cluster-node-timeout 2000) || { ok=0; break; }
		seeds="$seeds${seeds:+,}127.0.0.1:$cp"
	done
	if [ $ok -eq 0 ]; then bad "cannot start cluster nodes"; continue; fi
	# shellcheck disable=SC2046
	if ! "$cli" --cluster create $(echo "$seeds" | tr ',' ' ') --cluster-replicas 0 \
		--cluster-yes >"$tmp/cluster-create-$v.log" 2>&1; then
		bad "redis-cli --cluster create: $(tail -n 5 "$tmp/cluster-create-$v.log")"
		continue
	fi
	i=0
	for s in $(echo "$seeds" | tr ',' ' '); do
		port=${s##*:}
		until "$cli" -p "$port" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; do
			i=$((i + 1)); [ $i -gt 200 ] && break
			sleep 0.05
		done
	done
	echo "cluster ($v): $seeds"
	echo "== $v two processes (cluster)"
	timeout 30 "$bin" put "redis-cluster://$seeds" 43 48 || bad "$v cluster put"
	timeout 30 "$bin" get "redis://$seeds" 43 48 || bad "$v cluster get"
	echo "== $v cluster"
	KVRT_TEST_REDIS_CLUSTER=$seeds timeout 60 "$bin" cluster || bad "$v cluster"
done

# --- engines -----------------------------------------------------------------------
# Two engines in two processes through the standalone server
# (tests/remote_engine.c): write-behind, then a lookup + async load in a new
# process with an empty cache, bitwise equal; lookups while the server sleeps
# (answered "ask again" at once, then a miss; a hit once it woke); a dead
# server (quick misses);
# corrupted values (a miss or load errors, never wrong bytes).
for bin in $progs; do
	v=$(basename "$(dirname "$(dirname "$bin")")")
	eng=$(dirname "$bin")/remote_engine
	if [ ! -x "$eng" ]; then bad "$eng not built (ninja build/$v/remote-tools)"; continue; fi
	url=redis://127.0.0.1:$p1
	"$cli" -p "$p1" flushall >/dev/null 2>&1
	echo "== $v engines: write, then read in another process"
	timeout 30 "$eng" write "$url" 7 || bad "$v engine write"
	timeout 30 "$eng" read "$url" 7 hit || bad "$v engine read"
	echo "== $v engines: the reader first, the writer a second later"
	timeout 30 "$eng" read "$url" 9 late &
	late=$!
	sleep 1
	timeout 30 "$eng" write "$url" 9 full || bad "$v engine write (seed 9, full chunks)"
	wait "$late" || bad "$v engine read before the write"
	echo "== $v engines: lookups while Redis sleeps (never wait on it)"
	timeout 30 "$eng" slow "$url" 7 || bad "$v engine lookups while Redis sleeps"
	echo "== $v engines: Redis holds the first two chunks only"
	k2=$("$eng" key "$url" 7 2) && "$cli" -p "$p1" del "$k2" >/dev/null 2>&1 || bad "$v cannot delete chunk 2"
	timeout 30 "$eng" read "$url" 7 partial || bad "$v engine read, chunk 2 missing"
	echo "== $v engines: dead server"
	timeout 30 "$eng" read "redis://127.0.0.1:$(pick_port)" 7 safe || bad "$v engine dead server"
	echo "== $v engines: corrupted values"
	k1=$("$eng" key "$url" 7 1) && "$cli" -p "$p1" set "$k1" garbage >/dev/null 2>&1 \
		|| bad "$v cannot corrupt chunk 1"
	timeout 30 "$eng" read "$url" 7 safe || bad "$v engine read, chunk 1 corrupt"
	timeout 30 "$eng" write "$url" 8 || bad "$v engine write (seed 8)"
	k0=$("$eng" key "$url" 8 0) && "$cli" -p "$p1" set "$k0" "$(head -c 300 /dev/urandom | base64 -w0)" \
		>/dev/null 2>&1 || bad "$v cannot corrupt chunk 0"
	timeout 30 "$eng" read "$url" 8 safe || bad "$v engine read, chunk 0 corrupt"
	"$cli" -p "$p1" flushall >/dev/null 2>&1
done

[ $fail -eq 0 ] && echo "check-remote: ok"
exit $fail
