/* perf/suite_remote.c: the remote tier (actors/remote.c) next to
 * redis-benchmark on the same local redis-server, in the same run.
 *
 * The suite starts its own redis-server on a free loopback port (no
 * persistence), then for one chunk size (--opt remote_mib=N, default 16 MiB;
 * 4 with --quick):
 *   kvrt put       N chunks through kvrt_remote_write (checksum, SET), 4 in
 *                  flight, from the first submit to the last WRITTEN
 *   kvrt get       the same chunks through kvrt_remote_read (GET, header and
 *                  checksum verified, copied into the caller's buffer), 4 in
 *                  flight
 *   kvrt lookups   kvrt_remote_exists batches of 64 keys, one batch at a time
 *                  (a lookup waits for its answer): keys per second
 *   limits         redis-benchmark -t set,get -d SIZE -P 4 -c 1 (one
 *                  connection, 4 pipelined: kvrt's shape), and
 *                  redis-benchmark -P 64 -c 1 EXISTS <kvrt key> for lookups
 * Target: >= 0.8x redis-benchmark. LMCache's logged Redis put rate
 * (~1.4 GB/s) is shown as a second limit for put. The server is killed at
 * the end on every path. redis-benchmark missing: figures without a limit.
 */
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "actors/remote.h"
#include "perf/perf.h"
#include "runtime/actor.h"

extern char **environ;

#define _BASE 10u
#define _WINDOW 4u
#define _BATCH 64u
#define _LMCACHE_PUT_GBS 1.4

struct _sink {
	_Atomic uint64_t done[KVRT_REMOTE_EVENT_COUNT]; /* completions per event */
	_Atomic uint64_t errors;                        /* nonzero statuses */
	_Atomic uint64_t lead;                          /* sum of exists answers */
};

static void _sink_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct _sink *s = kvrt_actor_data(a);
	uint32_t ev = m->type - _BASE;
	if (m->arg.i64[2] != 0)
		atomic_fetch_add(&s->errors, 1);
	if (ev == KVRT_REMOTE_EXISTS_DONE)
		atomic_fetch_add(&s->lead, m->arg.u64[4]);
	if (ev < KVRT_REMOTE_EVENT_COUNT)
		atomic_fetch_add_explicit(&s->done[ev], 1, memory_order_release);
}

static const struct kvrt_actor_ops _sink_ops = {.handle = _sink_handle};

static uint64_t _done(struct _sink *s, enum kvrt_remote_event ev)
{
	return atomic_load_explicit(&s->done[ev], memory_order_acquire);
}

/* Wait until done[ev] >= want (or 30 s). */
static bool _wait(struct _sink *s, enum kvrt_remote_event ev, uint64_t want)
{
	uint64_t dl = kvrt_now_ns() + 30000000000ull;
	/* spin (yielding): usleep's timer slack would add ~60 us to a lookup */
	while (_done(s, ev) < want) {
		if (kvrt_now_ns() > dl)
			return false;
		sched_yield();
	}
	return true;
}

static bool _ping(int port)
{
	struct timeval tv = {0, 200000};
	redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
	bool ok = false;
	if (c && !c->err) {
		redisReply *r = redisCommand(c, "PING");
		ok = r && r->type == REDIS_REPLY_STATUS;
		freeReplyObject(r);
	}
	if (c)
		redisFree(c);
	return ok;
}

/* Spawn argv with stdout to *out_fd (a pipe) when out_fd, else /dev/null. */
static int _spawn(char *const argv[], pid_t *pid, int *out_fd)
{
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	int pfd[2] = {-1, -1};
	if (out_fd) {
		if (pipe(pfd) != 0)
			return -errno;
		posix_spawn_file_actions_adddup2(&fa, pfd[1], 1);
		posix_spawn_file_actions_addclose(&fa, pfd[0]);
		posix_spawn_file_actions_addclose(&fa, pfd[1]);
	} else {
		posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	}
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	int rc = posix_spawnp(pid, argv[0], &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	if (out_fd) {
		close(pfd[1]);
		if (rc)
			close(pfd[0]);
		else
			*out_fd = pfd[0];
	}
	return -rc;
}

/* Run redis-benchmark; return the requests/s of the line starting with
 * `label` ("SET", "GET", or the custom command), or 0. */
static int _bench(char *const argv[], const char *labels[], double rps[], int nl)
{
	pid_t pid;
	int fd;
	if (_spawn(argv, &pid, &fd) != 0)
		return -ENOENT;
	size_t cap = 1 << 16, len = 0;
	char *buf = malloc(cap);
	for (;;) {
		if (len + 1 >= cap) {
			cap *= 2;
			buf = realloc(buf, cap);
		}
		ssize_t k = read(fd, buf + len, cap - len - 1);
		if (k <= 0)
			break;
		len += (size_t)k;
	}
	close(fd);
	buf[len] = 0;
	int st;
	waitpid(pid, &st, 0);
	/* -q prints "NAME: 1234.56 requests per second, p50=..." after \r progress */
	for (char *p = buf; *p; p++)
		if (*p == '\r')
			*p = '\n';
	for (int i = 0; i < nl; i++) {
		rps[i] = 0;
		size_t ll = strlen(labels[i]);
		for (char *line = buf; line && *line; line = strchr(line, '\n')) {
			while (*line == '\n')
				line++;
			if (!strncmp(line, labels[i], ll) && line[ll] == ':' &&
			    strstr(line, "requests per second") &&
			    (!strchr(line, '\n') || strstr(line, "requests per second") < strchr(line, '\n')))
				rps[i] = strtod(line + ll + 1, NULL);
		}
	}
	free(buf);
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -EIO;
}

static int _run(struct kvrt_perf *p)
{
	bool quick = kvrt_perf_quick(p);
	uint64_t mib = strtoull(kvrt_perf_opt(p, "remote_mib", quick ? "4" : "16"), NULL, 0);
	if (mib < 1 || mib > 256) {
		kvrt_perf_note(p, "remote: remote_mib must be 1..256");
		return -EINVAL;
	}
	uint64_t size = mib << 20;
	uint64_t total = (quick ? 128ull : 512ull) << 20;
	uint32_t n = (uint32_t)(total / size);
	if (n < 8)
		n = 8;

	/* the server */
	int port = 0;
	uint64_t seed = kvrt_now_ns() ^ (uint64_t)getpid();
	for (int t = 0; t < 20 && !port; t++) {
		int cand = 20000 + (int)((seed >> 7) % 40000);
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		if (!_ping(cand))
			port = cand;
	}
	char ports[16], dir[] = "/tmp/kvrt-perf-remote.XXXXXX";
	if (!port || !mkdtemp(dir)) {
		kvrt_perf_note(p, "remote: no free port or temp dir");
		return -EIO;
	}
	snprintf(ports, sizeof ports, "%d", port);
	char *sargv[] = {"redis-server", "--port", ports, "--bind", "127.0.0.1", "--save", "",
			 "--appendonly", "no", "--daemonize", "no", "--dir", dir, NULL};
	pid_t spid;
	if (_spawn(sargv, &spid, NULL) != 0) {
		kvrt_perf_note(p, "remote: redis-server not found: suite skipped");
		rmdir(dir);
		return -ENOENT;
	}
	int rc = 0;
	bool up = false;
	for (int i = 0; i < 300 && !up; i++) {
		up = _ping(port);
		if (!up)
			usleep(10000);
	}
	struct kvrt_actor *sink_a = NULL;
	struct kvrt_remote *r = NULL;
	struct _sink sink = {0};
	uint8_t *src = NULL, *dst[_WINDOW] = {0};
	struct kvrt_chunk_header *h = NULL;
	if (!up) {
		kvrt_perf_note(p, "remote: redis-server did not start on port %d", port);
		rc = -EIO;
		goto out;
	}

	/* redis-benchmark, same value size, same shape (1 connection, 4 deep) */
	char sizes[24], ns[24], pl[8], nbuf[24];
	snprintf(sizes, sizeof sizes, "%llu", (unsigned long long)size);
	snprintf(pl, sizeof pl, "%u", _WINDOW);
	snprintf(ns, sizeof ns, "%u", n);
	char *bargv[] = {"redis-benchmark", "-h", "127.0.0.1", "-p", ports, "-t", "set,get",
			 "-d", sizes, "-n", ns, "-P", pl, "-c", "1", "-q", NULL};
	const char *bl[] = {"SET", "GET"};
	double brps[2] = {0, 0};
	bool have_bench = _bench(bargv, bl, brps, 2) == 0 && brps[0] > 0 && brps[1] > 0;

	rc = kvrt_actor_create(&sink_a, &(struct kvrt_actor_config){
						.name = "sink", .mailbox_size = 4096,
						.ops = &_sink_ops, .data = &sink});
	if (rc)
		goto out;
	char url[64];
	snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
	uint64_t nsh = 0x7065726672656dull;
	rc = kvrt_remote_open(&r, &(struct kvrt_remote_config){
					  .url = url, .timeout_ms = 10000,
					  .max_pending_writes = _WINDOW, .namespace_hash = nsh,
					  .notify = sink_a, .msg_base = _BASE});
	if (rc)
		goto out;

	/* one source buffer (random), n headers with distinct keys */
	src = malloc(size);
	h = calloc(n, sizeof *h);
	for (uint32_t i = 0; i < _WINDOW; i++)
		dst[i] = malloc(size);
	if (!src || !h || !dst[_WINDOW - 1]) {
		rc = -ENOMEM;
		goto out;
	}
	uint64_t x = 0x9e3779b97f4a7c15ull;
	for (uint64_t o = 0; o + 8 <= size; o += 8) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		memcpy(src + o, &x, 8);
	}
	for (uint32_t i = 0; i < _WINDOW; i++)
		memset(dst[i], 0xee, size);
	struct kvrt_chunk_shape shape = {.num_layers = 32, .token_bytes = (uint32_t)(size / 32 / 256),
					 .elem_size = 2, .layout = 1};
	for (uint32_t i = 0; i < n; i++) {
		h[i].namespace_hash = nsh;
		h[i].key = (struct kvrt_chunk_key){.lo = 0x1000 + i, .hi = seed ^ i};
		h[i].shape = shape;
		h[i].num_tokens = 256;
		h[i].payload_len = kvrt_chunk_payload_bytes(&shape, 256);
	}

	/* put: keep the window full */
	uint64_t t0 = kvrt_now_ns();
	for (uint32_t i = 0; i < n; i++) {
		int w;
		while ((w = kvrt_remote_write(r, &h[i], src, i)) == -EAGAIN)
			usleep(10);
		if (w) {
			rc = w;
			goto out;
		}
		kvrt_perf_progress(p, "remote put", i, n);
	}
	if (!_wait(&sink, KVRT_REMOTE_WRITTEN, n)) {
		rc = -ETIMEDOUT;
		goto out;
	}
	double put_s = (double)(kvrt_now_ns() - t0) / 1e9;
	kvrt_perf_progress(p, "remote put", n, n);

	/* get: _WINDOW reads in flight, one buffer each */
	t0 = kvrt_now_ns();
	for (uint32_t i = 0; i < n; i++) {
		if (i >= _WINDOW && !_wait(&sink, KVRT_REMOTE_READ_DONE, i - _WINDOW + 1)) {
			rc = -ETIMEDOUT;
			goto out;
		}
		int g;
		while ((g = kvrt_remote_read(r, h[i].key, dst[i % _WINDOW], size, i)) == -EAGAIN)
			usleep(10);
		if (g) {
			rc = g;
			goto out;
		}
	}
	if (!_wait(&sink, KVRT_REMOTE_READ_DONE, n)) {
		rc = -ETIMEDOUT;
		goto out;
	}
	double get_s = (double)(kvrt_now_ns() - t0) / 1e9;
	bool exact = memcmp(dst[(n - 1) % _WINDOW], src, size) == 0;

	/* lookups: batches of 64 keys, one at a time */
	uint32_t batches = quick ? 200 : 1000;
	struct kvrt_chunk_key keys[_BATCH];
	for (uint32_t i = 0; i < _BATCH; i++)
		keys[i] = h[i % n].key;
	t0 = kvrt_now_ns();
	for (uint32_t b = 0; b < batches; b++) {
		int e;
		while ((e = kvrt_remote_exists(r, keys, _BATCH, b)) == -EAGAIN)
			usleep(10);
		if (e || !_wait(&sink, KVRT_REMOTE_EXISTS_DONE, b + 1)) {
			rc = e ? e : -ETIMEDOUT;
			goto out;
		}
	}
	double ex_s = (double)(kvrt_now_ns() - t0) / 1e9;
	uint64_t errors = atomic_load(&sink.errors);
	bool lead_ok = atomic_load(&sink.lead) == (uint64_t)batches * _BATCH;

	char keyname[KVRT_REMOTE_KEY_BUF];
	kvrt_remote_key_name(nsh, h[0].key, keyname);
	snprintf(nbuf, sizeof nbuf, "%u", quick ? 50000 : 200000);
	char *eargv[] = {"redis-benchmark", "-h", "127.0.0.1", "-p", ports, "-n", nbuf, "-P",
			 "64", "-c", "1", "-q", "EXISTS", keyname, NULL};
	char elabel[KVRT_REMOTE_KEY_BUF + 8];
	snprintf(elabel, sizeof elabel, "EXISTS %s", keyname); /* custom commands print themselves */
	const char *el[] = {elabel};
	double erps = 0;
	bool have_ebench = _bench(eargv, el, &erps, 1) == 0 && erps > 0;

	double gb = (double)n * (double)size / 1e9;
	char name[64];
	snprintf(name, sizeof name, "put %llu MiB chunks", (unsigned long long)mib);
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){
				 .name = name, .value = gb / put_s, .unit = "GB/s",
				 .limit_name = have_bench ? "redis-benchmark SET -P 4" : NULL,
				 .limit = have_bench ? brps[0] * (double)size / 1e9 : 0,
				 .target = have_bench ? 0.8 : 0});
	snprintf(name, sizeof name, "put %llu MiB vs LMCache", (unsigned long long)mib);
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){
				 .name = name, .value = gb / put_s, .unit = "GB/s",
				 .limit_name = "LMCache logged Redis put", .limit = _LMCACHE_PUT_GBS,
				 .target = 1.0});
	snprintf(name, sizeof name, "get %llu MiB chunks", (unsigned long long)mib);
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){
				 .name = name, .value = gb / get_s, .unit = "GB/s",
				 .limit_name = have_bench ? "redis-benchmark GET -P 4" : NULL,
				 .limit = have_bench ? brps[1] * (double)size / 1e9 : 0,
				 .target = have_bench ? 0.8 : 0});
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){
				 .name = "lookups (EXISTS, 64/batch)",
				 .value = (double)batches * _BATCH / ex_s / 1e6, .unit = "Mkeys/s",
				 .limit_name = have_ebench ? "redis-benchmark EXISTS -P 64" : NULL,
				 .limit = have_ebench ? erps / 1e6 : 0,
				 .target = have_ebench ? 0.8 : 0});
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){
				 .name = "lookup batch latency (64 keys)",
				 .value = ex_s / batches * 1e6, .unit = "us"});
	kvrt_perf_note(p, "remote: local redis-server 127.0.0.1:%d, %u x %llu MiB values, %u in flight; kvrt verifies header+checksum on every get%s",
		       port, n, (unsigned long long)mib, _WINDOW,
		       exact ? "" : " (LAST GET DIFFERED: a bug)");
	if (errors || !lead_ok)
		kvrt_perf_note(p, "remote: %llu requests failed, exists answers %s",
			       (unsigned long long)errors, lead_ok ? "right" : "WRONG");
	if (!have_bench || !have_ebench)
		kvrt_perf_note(p, "remote: redis-benchmark missing or failed: figures without its limit");
	if (!exact || errors || !lead_ok)
		rc = -EIO;
out:
	if (r)
		kvrt_remote_close(r);
	kvrt_actor_destroy(sink_a);
	free(src);
	free(h);
	for (uint32_t i = 0; i < _WINDOW; i++)
		free(dst[i]);
	kill(spid, SIGKILL);
	waitpid(spid, NULL, 0);
	unlink(strcat(strcpy((char[64]){0}, dir), "/dump.rdb"));
	rmdir(dir);
	if (rc && rc != -EIO)
		kvrt_perf_note(p, "remote: failed: %s", strerror(-rc));
	return rc;
}

const struct kvrt_perf_suite kvrt_perf_suite_remote = {
	.name = "remote",
	.what = "Redis tier put/get GB/s and lookups/s next to redis-benchmark on a local redis-server",
	.run = _run,
};
