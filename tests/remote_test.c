/* tests/remote_test.c: the remote tier (actors/remote.c) against real Redis
 * servers. A plain program (not Criterion: it spawns and kills redis-server
 * in the fault scenario), run by tests/check-remote.sh, which starts the
 * servers and passes their addresses:
 *
 *   remote_test basic     KVRT_TEST_REDIS=host:port   round trips, exists,
 *                         misses, corrupt values, queue full, TTL, db, AUTH,
 *                         URL errors, unreachable server
 *   remote_test put URL SEED N / get URL SEED N        two engines, two
 *                         processes: get verifies what put wrote
 *   remote_test faults    KVRT_TEST_REDIS_SERVER=/usr/bin/redis-server
 *                         KVRT_TEST_FAULT_PORT=N KVRT_TEST_DIR=dir: kill -9
 *                         mid-write and mid-read, down, restart empty,
 *                         DEBUG SLEEP past the timeout
 *   remote_test cluster   KVRT_TEST_REDIS_CLUSTER=h:p,h:p,h:p  routing over
 *                         every master, ASK and MOVED after a slot migration,
 *                         a master going away
 * Exit 0 pass, 1 fail, 77 skip. Every check prints what a user would see.
 */
#include <errno.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "actors/remote.h"
#include "runtime/log.h"
#include "tests/test_util.h"

extern char **environ;

static int _fails;
#define CHECK(cond, ...)                                                                   \
	do {                                                                               \
		if (!(cond)) {                                                             \
			fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
			fprintf(stderr, __VA_ARGS__);                                      \
			fprintf(stderr, "\n");                                             \
			_fails++;                                                          \
		}                                                                          \
	} while (0)
#define REQUIRE(cond, ...)                                                                 \
	do {                                                                               \
		CHECK(cond, __VA_ARGS__);                                                  \
		if (!(cond))                                                               \
			exit(1);                                                           \
	} while (0)

#define MSG_BASE 100u
#define POISON 0x5a

/* --- the notify actor: collects completions ------------------------------------------ */

struct sink {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct kvrt_msg *v;
	size_t n, cap;
};

static void sink_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct sink *s = kvrt_actor_data(a);
	pthread_mutex_lock(&s->mu);
	if (s->n == s->cap) {
		s->cap = s->cap ? s->cap * 2 : 256;
		s->v = realloc(s->v, s->cap * sizeof *s->v);
		KVRT_ASSERT(s->v);
	}
	s->v[s->n++] = *m;
	pthread_cond_broadcast(&s->cv);
	pthread_mutex_unlock(&s->mu);
}

static const struct kvrt_actor_ops sink_ops = {.handle = sink_handle};
static struct sink g_sink = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0};
static struct kvrt_actor *g_notify;

static void sink_start(void)
{
	int rc = kvrt_actor_create(&g_notify, &(struct kvrt_actor_config){
						      .name = "sink", .mailbox_size = 4096,
						      .ops = &sink_ops, .data = &g_sink});
	REQUIRE(rc == 0, "sink actor: %d", rc);
}

/* Wait for the completion of (event, cookie); false after timeout_ms. */
static bool sink_wait(enum kvrt_remote_event ev, uint64_t cookie, struct kvrt_msg *out,
		      uint64_t timeout_ms)
{
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += (time_t)(timeout_ms / 1000);
	dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (dl.tv_nsec >= 1000000000) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&g_sink.mu);
	for (;;) {
		for (size_t i = 0; i < g_sink.n; i++) {
			if (g_sink.v[i].type == MSG_BASE + ev && g_sink.v[i].arg.u64[3] == cookie) {
				*out = g_sink.v[i];
				g_sink.v[i] = g_sink.v[--g_sink.n];
				pthread_mutex_unlock(&g_sink.mu);
				return true;
			}
		}
		if (pthread_cond_timedwait(&g_sink.cv, &g_sink.mu, &dl) == ETIMEDOUT) {
			pthread_mutex_unlock(&g_sink.mu);
			return false;
		}
	}
}

static int wait_status(enum kvrt_remote_event ev, uint64_t cookie, uint64_t timeout_ms,
		       uint64_t *bytes)
{
	struct kvrt_msg m;
	if (!sink_wait(ev, cookie, &m, timeout_ms))
		return 1000; /* "no completion": never a real status */
	if (bytes)
		*bytes = m.arg.u64[4];
	return (int)m.arg.i64[2];
}

/* --- chunks ------------------------------------------------------------------------------ */

static const struct kvrt_chunk_shape SHAPE_SMALL = {.num_layers = 4, .token_bytes = 256,
						    .elem_size = 2, .layout = 1}; /* 256 KiB at 256 tokens */

struct chunk {
	struct kvrt_chunk_header h;
	uint8_t *data;
};

static struct kvrt_chunk_key key_of(uint64_t seed, uint32_t i)
{
	uint64_t s = seed * 1000003u + i + 1;
	struct kvrt_chunk_key k = {.lo = kvrt_test_rand(&s), .hi = kvrt_test_rand(&s)};
	return k;
}

static void chunk_make(struct chunk *c, uint64_t ns, uint64_t seed, uint32_t i,
		       struct kvrt_chunk_shape shape, uint32_t tokens)
{
	memset(&c->h, 0, sizeof c->h);
	c->h.namespace_hash = ns;
	c->h.key = key_of(seed, i);
	c->h.shape = shape;
	c->h.num_tokens = tokens;
	c->h.payload_len = kvrt_chunk_payload_bytes(&shape, tokens);
	c->data = malloc(c->h.payload_len);
	KVRT_ASSERT(c->data);
	uint64_t s = seed ^ (0x9e3779b97f4a7c15ull * (i + 7));
	for (uint64_t o = 0; o + 8 <= c->h.payload_len; o += 8) {
		uint64_t x = kvrt_test_rand(&s);
		memcpy(c->data + o, &x, 8);
	}
}

static struct kvrt_remote *open_url(const char *url, uint64_t ns, uint32_t timeout_ms,
				    uint32_t max_pending, uint32_t ttl)
{
	struct kvrt_remote *r = NULL;
	int rc = kvrt_remote_open(&r, &(struct kvrt_remote_config){
					      .url = url, .timeout_ms = timeout_ms, .ttl_s = ttl,
					      .max_pending_writes = max_pending,
					      .namespace_hash = ns, .notify = g_notify,
					      .msg_base = MSG_BASE});
	REQUIRE(rc == 0, "open %s: %d", url, rc);
	return r;
}

/* Write chunks[0..n) and wait for every WRITTEN; returns how many were 0. */
static uint32_t put_all(struct kvrt_remote *r, struct chunk *c, uint32_t n, uint64_t cookie0)
{
	uint32_t ok = 0;
	for (uint32_t i = 0; i < n; i++) {
		int rc;
		while ((rc = kvrt_remote_write(r, &c[i].h, c[i].data, cookie0 + i)) == -EAGAIN)
			usleep(200);
		CHECK(rc == 0, "write %u: %d", i, rc);
	}
	for (uint32_t i = 0; i < n; i++) {
		int st = wait_status(KVRT_REMOTE_WRITTEN, cookie0 + i, 5000, NULL);
		CHECK(st == 0, "WRITTEN %u: %d", i, st);
		ok += st == 0;
	}
	return ok;
}

/* Read chunk c back into a poisoned buffer and compare; returns the status. */
static int get_check(struct kvrt_remote *r, const struct chunk *c, uint64_t cookie)
{
	uint64_t cap = c->h.payload_len + 4096;
	uint8_t *dst = malloc(cap);
	memset(dst, POISON, cap);
	int rc = kvrt_remote_read(r, c->h.key, dst, cap, cookie);
	CHECK(rc == 0, "read: %d", rc);
	uint64_t bytes = 0;
	struct kvrt_msg m = {0};
	int st = sink_wait(KVRT_REMOTE_READ_DONE, cookie, &m, 5000) ? (int)m.arg.i64[2] : 1000;
	bytes = m.arg.u64[4];
	if (st == 0) {
		CHECK(m.arg32 == c->h.num_tokens, "num_tokens %u, want %u", m.arg32, c->h.num_tokens);
		CHECK(bytes == c->h.payload_len, "read %" PRIu64 " bytes, want %" PRIu64, bytes,
		      c->h.payload_len);
		CHECK(memcmp(dst, c->data, c->h.payload_len) == 0, "read returned other bytes");
		CHECK(dst[c->h.payload_len] == POISON, "read wrote past the payload");
	}
	free(dst);
	return st;
}

static redisContext *sync_conn(const char *hostport)
{
	char host[256];
	snprintf(host, sizeof host, "%s", hostport);
	char *colon = strrchr(host, ':');
	REQUIRE(colon, "address %s", hostport);
	*colon = 0;
	struct timeval tv = {5, 0};
	redisContext *c = redisConnectWithTimeout(host, atoi(colon + 1), tv);
	REQUIRE(c && !c->err, "connect %s: %s", hostport, c ? c->errstr : "oom");
	return c;
}

static void key_name(uint64_t ns, struct kvrt_chunk_key k, char out[KVRT_REMOTE_KEY_BUF])
{
	kvrt_remote_key_name(ns, k, out);
}

/* --- basic ---------------------------------------------------------------------------------- */

static int t_urls(const char *addr)
{
	struct kvrt_remote *r;
	struct kvrt_remote_config cfg = {.notify = g_notify, .msg_base = MSG_BASE};
	const char *bad[] = {"", "http://x:1", "redis://", "redis://h:0", "redis://h:99999",
			     "redis://h:12a", "redis://h:1/x", "redis://h:1?timeout=3",
			     "redis://a:1,b:2/3", "redis://a:1,", "redis://%zz@h:1",
			     "redis://[::1:6379"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(bad); i++) {
		cfg.url = bad[i];
		int rc = kvrt_remote_open(&r, &cfg);
		CHECK(rc == -EINVAL && r == NULL, "url '%s': %d", bad[i], rc);
	}
	cfg.url = "rediss://127.0.0.1:6380";
	int rc = kvrt_remote_open(&r, &cfg);
	CHECK(rc == -EPROTONOSUPPORT, "rediss: %d", rc);
	cfg.url = NULL;
	rc = kvrt_remote_open(&r, &cfg);
	CHECK(rc == -EINVAL, "NULL url: %d", rc);
	/* A password against a server that has none: refused at open. */
	char url[300];
	snprintf(url, sizeof url, "redis://:s%%65cret@%s", addr);
	cfg.url = url;
	cfg.timeout_ms = 2000;
	rc = kvrt_remote_open(&r, &cfg);
	CHECK(rc == -EACCES, "AUTH refused: %d", rc);
	/* Key names and slots are fixed by the spec (the same on every host). */
	char name[KVRT_REMOTE_KEY_BUF];
	kvrt_remote_key_name(0x0123456789abcdefull,
			     (struct kvrt_chunk_key){.lo = 0x1111222233334444ull,
						     .hi = 0xaaaabbbbccccddddull},
			     name);
	CHECK(!strcmp(name, "kvrt:1:0123456789abcdef:aaaabbbbccccdddd1111222233334444"),
	      "key name %s", name);
	CHECK(strlen(name) == KVRT_REMOTE_KEY_LEN, "key length %zu", strlen(name));
	CHECK(kvrt_remote_key_slot("123456789", 9) == 12739, "CRC16 slot of 123456789");
	CHECK(kvrt_remote_key_slot("{user1000}.following", 20) ==
		      kvrt_remote_key_slot("user1000", 8), "hash tag");
	CHECK(kvrt_remote_key_slot("foo{}{bar}", 10) == kvrt_remote_key_slot("foo{}{bar}", 10) &&
		      kvrt_remote_key_slot("foo{}{bar}", 10) != kvrt_remote_key_slot("bar", 3),
	      "empty tag hashes the whole key");
	return 0;
}

static int t_basic(void)
{
	const char *addr = getenv("KVRT_TEST_REDIS");
	if (!addr) {
		printf("skip: KVRT_TEST_REDIS not set\n");
		return 77;
	}
	t_urls(addr);
	char url[300];
	snprintf(url, sizeof url, "redis://%s", addr);
	uint64_t ns = 0x6b7672740001ull ^ (uint64_t)getpid() << 20;
	struct kvrt_remote *r = open_url(url, ns, 2000, 0, 0);
	enum { N = 16 };
	struct chunk c[N];
	for (uint32_t i = 0; i < N; i++)
		chunk_make(&c[i], ns, 11, i, SHAPE_SMALL, i == N - 1 ? 100 : 256);
	CHECK(put_all(r, c, N, 1000) == N, "writes");
	for (uint32_t i = 0; i < N; i++)
		CHECK(get_check(r, &c[i], 2000 + i) == 0, "read %u", i);

	/* exists: leading run, stops at the first missing key */
	struct kvrt_chunk_key keys[N + 2];
	for (uint32_t i = 0; i < N; i++)
		keys[i] = c[i].h.key;
	keys[N] = key_of(999, 0);
	keys[N + 1] = c[0].h.key;
	CHECK(kvrt_remote_exists(r, keys, N + 2, 3000) == 0, "exists");
	uint64_t lead = 77;
	int st = wait_status(KVRT_REMOTE_EXISTS_DONE, 3000, 5000, &lead);
	CHECK(st == 0 && lead == N, "exists: status %d lead %" PRIu64, st, lead);
	CHECK(kvrt_remote_exists(r, keys + N, 2, 3001) == 0, "exists");
	st = wait_status(KVRT_REMOTE_EXISTS_DONE, 3001, 5000, &lead);
	CHECK(st == 0 && lead == 0, "exists missing first: %d %" PRIu64, st, lead);
	CHECK(kvrt_remote_exists(r, keys, 0, 3002) == -EINVAL, "exists n=0");

	/* miss, and a too-small buffer */
	uint8_t small[64];
	memset(small, POISON, sizeof small);
	CHECK(kvrt_remote_read(r, key_of(999, 0), small, sizeof small, 3100) == 0, "read");
	st = wait_status(KVRT_REMOTE_READ_DONE, 3100, 5000, NULL);
	CHECK(st == -ENOENT, "missing key: %d", st);
	CHECK(kvrt_remote_read(r, c[1].h.key, small, sizeof small, 3101) == 0, "read");
	st = wait_status(KVRT_REMOTE_READ_DONE, 3101, 5000, NULL);
	CHECK(st == -EMSGSIZE, "small buffer: %d", st);
	for (size_t i = 0; i < sizeof small; i++)
		CHECK(small[i] == POISON, "dst written on failure");

	/* remove */
	CHECK(kvrt_remote_remove(r, c[0].h.key, 3200) == 0, "remove");
	uint64_t del = 0;
	st = wait_status(KVRT_REMOTE_REMOVED, 3200, 5000, &del);
	CHECK(st == 0 && del == 1, "remove: %d %" PRIu64, st, del);
	CHECK(get_check(r, &c[0], 3201) == -ENOENT, "read after remove");
	CHECK(kvrt_remote_remove(r, c[0].h.key, 3202) == 0, "remove");
	st = wait_status(KVRT_REMOTE_REMOVED, 3202, 5000, &del);
	CHECK(st == 0 && del == 0, "remove twice: %d %" PRIu64, st, del);

	/* corrupt values: never served, then deleted */
	redisContext *sc = sync_conn(addr);
	char name[KVRT_REMOTE_KEY_BUF], name2[KVRT_REMOTE_KEY_BUF];
	key_name(ns, c[1].h.key, name);
	redisReply *rep = redisCommand(sc, "SET %s %s", name, "garbage, not a chunk");
	freeReplyObject(rep);
	CHECK(get_check(r, &c[1], 3300) == -EBADMSG, "garbage value");
	CHECK(get_check(r, &c[1], 3301) == -ENOENT, "garbage value deleted");
	key_name(ns, c[2].h.key, name);
	rep = redisCommand(sc, "SETRANGE %s %d %b", name, 80 + 1000, "\x01", (size_t)1);
	freeReplyObject(rep);
	CHECK(get_check(r, &c[2], 3302) == -EBADMSG, "flipped payload byte");
	key_name(ns, c[3].h.key, name);
	key_name(ns, c[4].h.key, name2);
	rep = redisCommand(sc, "COPY %s %s REPLACE", name, name2);
	freeReplyObject(rep);
	CHECK(get_check(r, &c[4], 3303) == -EBADMSG, "another key's value");
	key_name(ns, c[5].h.key, name);
	rep = redisCommand(sc, "GETRANGE %s 0 -11", name);
	REQUIRE(rep && rep->type == REDIS_REPLY_STRING, "GETRANGE");
	redisReply *rep2 = redisCommand(sc, "SET %s %b", name, rep->str, (size_t)rep->len);
	freeReplyObject(rep);
	freeReplyObject(rep2);
	CHECK(get_check(r, &c[5], 3304) == -EBADMSG, "truncated value");
	/* c[5]'s corrupt value is deleted by kvrt in the background: a list
	 * pushed under its key could be deleted too. c[0]'s removal was
	 * confirmed above: nothing of kvrt's is in flight on that key. */
	key_name(ns, c[0].h.key, name);
	rep = redisCommand(sc, "LPUSH %s x", name);
	freeReplyObject(rep);
	CHECK(get_check(r, &c[0], 3305) == -EREMOTEIO, "a list under the key (WRONGTYPE)");
	rep = redisCommand(sc, "DEL %s", name);
	freeReplyObject(rep);

	/* another namespace does not see these chunks */
	struct kvrt_remote *r2 = open_url(url, ns + 1, 2000, 0, 0);
	struct chunk other = c[6];
	CHECK(get_check(r2, &other, 3400) == -ENOENT, "other namespace");
	kvrt_remote_close(r2);

	/* queue full: writes beyond max_pending_writes are dropped and counted */
	struct kvrt_remote *r3 = open_url(url, ns, 2000, 2, 0);
	uint32_t accepted = 0, refused = 0;
	uint64_t acc_cookie[64];
	for (uint32_t i = 0; i < 64; i++) {
		int rc = kvrt_remote_write(r3, &c[6 + i % 8].h, c[6 + i % 8].data, 4000 + i);
		if (rc == 0)
			acc_cookie[accepted++] = 4000 + i;
		else
			refused += rc == -EAGAIN;
	}
	for (uint32_t i = 0; i < accepted; i++)
		CHECK(wait_status(KVRT_REMOTE_WRITTEN, acc_cookie[i], 5000, NULL) == 0,
		      "accepted write");
	struct kvrt_remote_stats s3;
	kvrt_remote_stats(r3, &s3);
	CHECK(refused > 0 && s3.dropped_full == refused && accepted + refused == 64,
	      "queue full: accepted %u refused %u counted %" PRIu64, accepted, refused,
	      s3.dropped_full);
	CHECK(s3.pending_writes == 0, "pending %u", s3.pending_writes);
	kvrt_remote_close(r3);

	/* TTL */
	struct kvrt_remote *r4 = open_url(url, ns, 2000, 0, 100);
	CHECK(put_all(r4, &c[7], 1, 4100) == 1, "ttl write");
	key_name(ns, c[7].h.key, name);
	rep = redisCommand(sc, "PTTL %s", name);
	CHECK(rep && rep->type == REDIS_REPLY_INTEGER && rep->integer > 90000 &&
		      rep->integer <= 100000, "PTTL %lld", rep ? rep->integer : -9);
	freeReplyObject(rep);
	kvrt_remote_close(r4);

	/* database number */
	snprintf(url, sizeof url, "redis://%s/3", addr);
	struct kvrt_remote *r5 = open_url(url, ns, 2000, 0, 0);
	CHECK(put_all(r5, &c[8], 1, 4200) == 1, "db 3 write");
	CHECK(get_check(r5, &c[8], 4201) == 0, "db 3 read");
	key_name(ns, c[8].h.key, name);
	rep = redisCommand(sc, "DEL %s", name); /* db 0: c[8] is there from put_all(r) */
	freeReplyObject(rep);
	rep = redisCommand(sc, "SELECT 3");
	freeReplyObject(rep);
	rep = redisCommand(sc, "EXISTS %s", name);
	CHECK(rep && rep->integer == 1, "value in db 3");
	freeReplyObject(rep);
	rep = redisCommand(sc, "FLUSHDB");
	freeReplyObject(rep);
	kvrt_remote_close(r5);
	redisFree(sc);

	struct kvrt_remote_stats s;
	kvrt_remote_stats(r, &s);
	CHECK(s.writes == N && s.reads >= N && s.err_corrupt >= 4 && s.nodes_up == 1 && !s.cluster,
	      "stats: writes %" PRIu64 " reads %" PRIu64 " corrupt %" PRIu64, s.writes, s.reads,
	      s.err_corrupt);
	printf("basic: %" PRIu64 " writes, %" PRIu64 " reads, %" PRIu64 " misses, %" PRIu64
	       " corrupt\n",
	       s.writes, s.reads, s.misses, s.err_corrupt);
	kvrt_remote_close(r);

	/* unreachable server: open warns and returns; reads miss, writes drop */
	uint64_t t0 = kvrt_now_ns();
	struct kvrt_remote *r6 = open_url("redis://127.0.0.1:1", ns, 300, 0, 0);
	CHECK(kvrt_now_ns() - t0 < 1500000000ull, "open of a dead server took too long");
	uint8_t b[64];
	CHECK(kvrt_remote_read(r6, c[9].h.key, b, sizeof b, 4300) == 0, "read");
	st = wait_status(KVRT_REMOTE_READ_DONE, 4300, 3000, NULL);
	CHECK(st == -ENOTCONN || st == -ECONNREFUSED, "read from a dead server: %d", st);
	int rc = kvrt_remote_write(r6, &c[9].h, c[9].data, 4301);
	CHECK(rc == -ENOTCONN, "write to a dead server: %d", rc);
	kvrt_remote_close(r6);
	for (uint32_t i = 0; i < N; i++)
		free(c[i].data);
	return 0;
}

/* --- two processes ---------------------------------------------------------------------- */

static int t_putget(bool put, const char *url, uint64_t seed, uint32_t n)
{
	uint64_t ns = 0x5eed000000ull + seed;
	struct kvrt_remote *r = open_url(url, ns, 3000, 0, 0);
	struct chunk *c = calloc(n, sizeof *c);
	for (uint32_t i = 0; i < n; i++)
		chunk_make(&c[i], ns, seed, i, SHAPE_SMALL, 256);
	if (put) {
		CHECK(put_all(r, c, n, 1) == n, "put");
	} else {
		struct kvrt_chunk_key *keys = calloc(n, sizeof *keys);
		for (uint32_t i = 0; i < n; i++)
			keys[i] = c[i].h.key;
		CHECK(kvrt_remote_exists(r, keys, n, 7) == 0, "exists");
		uint64_t lead = 0;
		int st = wait_status(KVRT_REMOTE_EXISTS_DONE, 7, 5000, &lead);
		CHECK(st == 0 && lead == n, "the other process's chunks: %d lead %" PRIu64, st, lead);
		for (uint32_t i = 0; i < n; i++)
			CHECK(get_check(r, &c[i], 100 + i) == 0, "get %u", i);
		free(keys);
	}
	struct kvrt_remote_stats s;
	kvrt_remote_stats(r, &s);
	printf("%s %s: %u chunks, nodes %u (cluster %d)\n", put ? "put" : "get", url, n, s.nodes,
	       s.cluster);
	kvrt_remote_close(r);
	for (uint32_t i = 0; i < n; i++)
		free(c[i].data);
	free(c);
	return 0;
}

/* --- faults ------------------------------------------------------------------------------ */

static pid_t spawn_server(const char *bin, int port, const char *dir)
{
	char ports[16], pidf[512], logf[512];
	snprintf(ports, sizeof ports, "%d", port);
	snprintf(pidf, sizeof pidf, "%s/fault-%d.pid", dir, port);
	snprintf(logf, sizeof logf, "%s/fault-%d.log", dir, port);
	char *argv[] = {(char *)bin, "--port", ports, "--bind", "127.0.0.1", "--save", "",
			"--appendonly", "no", "--daemonize", "no", "--enable-debug-command", "yes",
			"--dir", (char *)dir, "--pidfile", pidf, "--logfile", logf, NULL};
	pid_t pid;
	int rc = posix_spawn(&pid, bin, NULL, NULL, argv, environ);
	REQUIRE(rc == 0, "posix_spawn %s: %s", bin, strerror(rc));
	for (int i = 0; i < 500; i++) {
		struct timeval tv = {0, 200000};
		redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
		if (c && !c->err) {
			redisReply *rep = redisCommand(c, "PING");
			bool ok = rep && rep->type == REDIS_REPLY_STATUS;
			freeReplyObject(rep);
			redisFree(c);
			if (ok)
				return pid;
		} else if (c) {
			redisFree(c);
		}
		usleep(10000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	REQUIRE(0, "redis-server on port %d did not start", port);
	return -1;
}

static void kill_server(pid_t pid)
{
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

static bool wait_up(struct kvrt_remote *r, uint32_t want, uint64_t ms)
{
	for (uint64_t i = 0; i < ms / 10; i++) {
		struct kvrt_remote_stats s;
		kvrt_remote_stats(r, &s);
		if (s.nodes_up >= want)
			return true;
		usleep(10000);
	}
	return false;
}

static bool is_conn_error(int st)
{
	return st == -ENOTCONN || st == -ECONNREFUSED || st == -ECONNRESET || st == -ETIMEDOUT;
}

static int t_faults(void)
{
	const char *bin = getenv("KVRT_TEST_REDIS_SERVER");
	const char *ps = getenv("KVRT_TEST_FAULT_PORT");
	const char *dir = getenv("KVRT_TEST_DIR");
	if (!bin || !ps || !dir) {
		printf("skip: KVRT_TEST_REDIS_SERVER, KVRT_TEST_FAULT_PORT, KVRT_TEST_DIR not set\n");
		return 77;
	}
	int port = atoi(ps);
	char url[128], addr[64];
	snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
	snprintf(url, sizeof url, "redis://%s", addr);
	pid_t pid = spawn_server(bin, port, dir);
	uint64_t ns = 0xfa017ull;
	struct kvrt_remote *r = open_url(url, ns, 500, 64, 0);
	enum { N = 8 };
	const struct kvrt_chunk_shape big = {.num_layers = 32, .token_bytes = 2048, .elem_size = 2,
					     .layout = 1}; /* 16 MiB at 256 tokens */
	struct chunk c[N];
	for (uint32_t i = 0; i < N; i++)
		chunk_make(&c[i], ns, 21, i, big, 256);
	CHECK(put_all(r, c, N, 100) == N, "writes");

	/* kill -9 mid-read: served reads are exact, the rest fail; no hang */
	uint64_t cap = c[0].h.payload_len;
	uint8_t *dst[N];
	for (uint32_t i = 0; i < N; i++) {
		dst[i] = malloc(cap);
		memset(dst[i], POISON, cap);
		CHECK(kvrt_remote_read(r, c[i].h.key, dst[i], cap, 200 + i) == 0, "read");
	}
	usleep(2000);
	kill_server(pid);
	uint32_t served = 0, failed = 0;
	for (uint32_t i = 0; i < N; i++) {
		int st = wait_status(KVRT_REMOTE_READ_DONE, 200 + i, 3000, NULL);
		if (st == 0) {
			served++;
			CHECK(memcmp(dst[i], c[i].data, cap) == 0, "wrong KV served mid-kill");
		} else {
			failed++;
			CHECK(is_conn_error(st), "read mid-kill: status %d", st);
		}
	}
	printf("faults: kill mid-read: %u served exact, %u failed\n", served, failed);

	/* down: reads miss, writes drop */
	CHECK(kvrt_remote_read(r, c[0].h.key, dst[0], cap, 300) == 0, "read");
	int st = wait_status(KVRT_REMOTE_READ_DONE, 300, 3000, NULL);
	CHECK(is_conn_error(st), "read while down: %d", st);
	int rc = kvrt_remote_write(r, &c[0].h, c[0].data, 301);
	if (rc == 0) {
		st = wait_status(KVRT_REMOTE_WRITTEN, 301, 3000, NULL);
		CHECK(is_conn_error(st), "write while down: %d", st);
	} else {
		CHECK(rc == -ENOTCONN, "write while down: %d", rc);
	}
	struct kvrt_remote_stats s;
	kvrt_remote_stats(r, &s);
	CHECK(s.dropped_down >= 1 && s.nodes_up == 0, "dropped_down %" PRIu64, s.dropped_down);

	/* restarted empty: the engine reconnects; old chunks are misses */
	pid = spawn_server(bin, port, dir);
	CHECK(wait_up(r, 1, 5000), "no reconnect within 5 s");
	CHECK(get_check(r, &c[0], 400) == -ENOENT, "after an empty restart");
	CHECK(put_all(r, c, N, 500) == N, "writes after restart");
	CHECK(get_check(r, &c[1], 501) == 0, "read after restart");

	/* kill -9 mid-write: every write completes (stored or failed); no hang */
	for (uint32_t i = 0; i < N; i++) {
		c[i].h.key.lo ^= 0xffff; /* new keys */
		CHECK(kvrt_remote_write(r, &c[i].h, c[i].data, 600 + i) == 0, "write");
	}
	usleep(2000);
	kill_server(pid);
	uint32_t stored = 0;
	for (uint32_t i = 0; i < N; i++) {
		st = wait_status(KVRT_REMOTE_WRITTEN, 600 + i, 3000, NULL);
		CHECK(st == 0 || is_conn_error(st), "write mid-kill: %d", st);
		stored += st == 0;
	}
	printf("faults: kill mid-write: %u of %u acknowledged before the kill\n", stored, N);
	pid = spawn_server(bin, port, dir);
	CHECK(wait_up(r, 1, 5000), "no reconnect within 5 s");
	CHECK(put_all(r, c, 2, 700) == 2, "writes after the second restart");

	/* a slow server: DEBUG SLEEP past the 500 ms timeout */
	redisContext *sc = sync_conn(addr);
	redisAppendCommand(sc, "DEBUG SLEEP 1.5");
	int done = 0;
	while (!done)
		REQUIRE(redisBufferWrite(sc, &done) == REDIS_OK, "send DEBUG SLEEP");
	usleep(50000);
	uint64_t t0 = kvrt_now_ns();
	memset(dst[0], POISON, cap);
	CHECK(kvrt_remote_read(r, c[0].h.key, dst[0], cap, 800) == 0, "read");
	st = wait_status(KVRT_REMOTE_READ_DONE, 800, 3000, NULL);
	double ms = (double)(kvrt_now_ns() - t0) / 1e6;
	CHECK(st == -ETIMEDOUT, "read from a sleeping server: %d", st);
	CHECK(ms >= 400 && ms < 1200, "timeout after %.0f ms (timeout 500)", ms);
	printf("faults: DEBUG SLEEP: read failed with %d after %.0f ms\n", st, ms);
	redisReply *rep = NULL;
	redisGetReply(sc, (void **)&rep); /* waits the sleep out */
	freeReplyObject(rep);
	redisFree(sc);
	CHECK(wait_up(r, 1, 5000), "no reconnect after the sleep");
	CHECK(get_check(r, &c[0], 801) == 0, "read after the sleep");

	kvrt_remote_stats(r, &s);
	printf("faults: timeouts %" PRIu64 ", connection errors %" PRIu64 ", reconnects %" PRIu64
	       ", dropped writes %" PRIu64 "\n",
	       s.err_timeout, s.err_conn, s.connects, s.dropped_down);
	CHECK(s.err_timeout >= 1 && s.connects >= 3, "stats");
	kvrt_remote_close(r);
	kill_server(pid);
	for (uint32_t i = 0; i < N; i++) {
		free(c[i].data);
		free(dst[i]);
	}
	return 0;
}

/* --- cluster ----------------------------------------------------------------------------- */

struct cnode {
	char id[64];
	char addr[64];
	int lo[8], hi[8], nr;
};

static int cluster_nodes(const char *addr, struct cnode *v, int max)
{
	redisContext *sc = sync_conn(addr);
	redisReply *rep = redisCommand(sc, "CLUSTER NODES");
	REQUIRE(rep && rep->type == REDIS_REPLY_STRING, "CLUSTER NODES");
	int n = 0;
	char *save = NULL;
	for (char *line = strtok_r(rep->str, "\n", &save); line && n < max;
	     line = strtok_r(NULL, "\n", &save)) {
		char *f[32];
		int nf = 0;
		char *s2 = NULL;
		for (char *t = strtok_r(line, " ", &s2); t && nf < 32; t = strtok_r(NULL, " ", &s2))
			f[nf++] = t;
		if (nf < 8 || !strstr(f[2], "master"))
			continue;
		struct cnode *c = &v[n++];
		memset(c, 0, sizeof *c);
		snprintf(c->id, sizeof c->id, "%s", f[0]);
		snprintf(c->addr, sizeof c->addr, "%s", f[1]);
		*strchr(c->addr, '@') = 0;
		for (int i = 8; i < nf && c->nr < 8; i++) {
			if (f[i][0] == '[')
				continue;
			char *dash = strchr(f[i], '-');
			c->lo[c->nr] = atoi(f[i]);
			c->hi[c->nr] = dash ? atoi(dash + 1) : c->lo[c->nr];
			c->nr++;
		}
	}
	freeReplyObject(rep);
	redisFree(sc);
	return n;
}

static int owner_of(struct cnode *v, int n, uint32_t slot)
{
	for (int i = 0; i < n; i++)
		for (int j = 0; j < v[i].nr; j++)
			if ((int)slot >= v[i].lo[j] && (int)slot <= v[i].hi[j])
				return i;
	return -1;
}

static void cmd_ok(const char *addr, const char *fmt, const char *a, const char *b, uint32_t s)
{
	redisContext *sc = sync_conn(addr);
	char cmd[512];
	snprintf(cmd, sizeof cmd, fmt, s, a, b);
	redisReply *rep = redisCommand(sc, cmd);
	CHECK(rep && rep->type != REDIS_REPLY_ERROR, "%s on %s: %s", cmd, addr,
	      rep ? (rep->str ? rep->str : "?") : sc->errstr);
	freeReplyObject(rep);
	redisFree(sc);
}

static int t_cluster(void)
{
	const char *seeds = getenv("KVRT_TEST_REDIS_CLUSTER");
	if (!seeds) {
		printf("skip: KVRT_TEST_REDIS_CLUSTER not set\n");
		return 77;
	}
	char first[64];
	snprintf(first, sizeof first, "%s", seeds);
	if (strchr(first, ','))
		*strchr(first, ',') = 0;
	char url[512];
	/* One seed: the rest of the cluster is discovered. */
	snprintf(url, sizeof url, "redis-cluster://%s", first);
	uint64_t ns = 0xc105e7ull;
	struct kvrt_remote *r = open_url(url, ns, 2000, 64, 0);
	struct kvrt_remote_stats s;
	kvrt_remote_stats(r, &s);
	CHECK(s.cluster && s.nodes >= 3, "cluster with %u nodes", s.nodes);
	enum { N = 48 };
	struct chunk c[N];
	for (uint32_t i = 0; i < N; i++)
		chunk_make(&c[i], ns, 31, i, SHAPE_SMALL, 256);
	CHECK(put_all(r, c, N, 100) == N, "writes");
	for (uint32_t i = 0; i < N; i++)
		CHECK(get_check(r, &c[i], 200 + i) == 0, "read %u", i);

	/* chunks landed on every master */
	struct cnode nodes[8];
	int nn = cluster_nodes(first, nodes, 8);
	CHECK(nn == 3, "%d masters", nn);
	for (int i = 0; i < nn; i++) {
		redisContext *sc = sync_conn(nodes[i].addr);
		redisReply *rep = redisCommand(sc, "DBSIZE");
		CHECK(rep && rep->integer > 0, "master %s holds no chunk", nodes[i].addr);
		printf("cluster: master %s holds %lld chunks\n", nodes[i].addr, rep ? rep->integer : -1);
		freeReplyObject(rep);
		redisFree(sc);
	}
	struct kvrt_chunk_key keys[N];
	for (uint32_t i = 0; i < N; i++)
		keys[i] = c[i].h.key;
	CHECK(kvrt_remote_exists(r, keys, N, 300) == 0, "exists");
	uint64_t lead = 0;
	int st = wait_status(KVRT_REMOTE_EXISTS_DONE, 300, 5000, &lead);
	CHECK(st == 0 && lead == N, "exists across masters: %d %" PRIu64, st, lead);

	/* migrate chunk 0's slot to another master: ASK while migrating, MOVED after */
	char name[KVRT_REMOTE_KEY_BUF];
	key_name(ns, c[0].h.key, name);
	uint32_t slot = kvrt_remote_key_slot(name, strlen(name));
	int src = owner_of(nodes, nn, slot);
	REQUIRE(src >= 0, "owner of slot %u", slot);
	int dst = (src + 1) % nn;
	char dhost[64];
	snprintf(dhost, sizeof dhost, "%s", nodes[dst].addr);
	char *dport = strrchr(dhost, ':');
	*dport++ = 0;
	cmd_ok(nodes[dst].addr, "CLUSTER SETSLOT %u IMPORTING %s%s", nodes[src].id, "", slot);
	cmd_ok(nodes[src].addr, "CLUSTER SETSLOT %u MIGRATING %s%s", nodes[dst].id, "", slot);
	{
		redisContext *sc = sync_conn(nodes[src].addr);
		redisReply *rep = redisCommand(sc, "MIGRATE %s %s %s 0 5000 KEYS %s", dhost, dport, "",
					       name);
		CHECK(rep && rep->type == REDIS_REPLY_STATUS, "MIGRATE: %s",
		      rep && rep->str ? rep->str : "?");
		freeReplyObject(rep);
		redisFree(sc);
	}
	CHECK(get_check(r, &c[0], 400) == 0, "read during migration (ASK)");
	kvrt_remote_stats(r, &s);
	CHECK(s.asked >= 1, "asked %" PRIu64, s.asked);
	for (int i = 0; i < nn; i++)
		cmd_ok(nodes[i].addr, "CLUSTER SETSLOT %u NODE %s%s", nodes[dst].id, "", slot);
	CHECK(get_check(r, &c[0], 401) == 0, "read after resharding (MOVED)");
	kvrt_remote_stats(r, &s);
	CHECK(s.moved >= 1, "moved %" PRIu64, s.moved);
	printf("cluster: slot %u moved %s -> %s: ASK %" PRIu64 ", MOVED %" PRIu64
	       ", refreshes %" PRIu64 "\n",
	       slot, nodes[src].addr, nodes[dst].addr, s.asked, s.moved, s.refreshes);
	CHECK(get_check(r, &c[0], 402) == 0, "read after the table update");

	/* a master goes away: its chunks become misses/errors, the rest are exact */
	int victim = (dst + 1) % nn;
	{
		redisContext *sc = sync_conn(nodes[victim].addr);
		redisReply *rep = redisCommand(sc, "SHUTDOWN NOSAVE");
		freeReplyObject(rep);
		redisFree(sc);
	}
	usleep(100000);
	uint32_t ok = 0, miss = 0;
	uint64_t t0 = kvrt_now_ns();
	for (uint32_t i = 0; i < N; i++) {
		key_name(ns, c[i].h.key, name);
		int own = owner_of(nodes, nn, kvrt_remote_key_slot(name, strlen(name)));
		if (i == 0)
			own = dst;
		st = get_check(r, &c[i], 500 + i);
		if (own == victim)
			CHECK(st != 0, "chunk %u of a dead master served", i);
		CHECK(st == 0 || is_conn_error(st) || st == -EREMOTEIO || st == -EHOSTUNREACH,
		      "read with a master down: %d", st);
		ok += st == 0;
		miss += st != 0;
	}
	printf("cluster: master %s down: %u reads exact, %u misses, %.0f ms for %u reads\n",
	       nodes[victim].addr, ok, miss, (double)(kvrt_now_ns() - t0) / 1e6, N);
	CHECK(miss > 0, "no miss with a master down");
	kvrt_remote_close(r);
	for (uint32_t i = 0; i < N; i++)
		free(c[i].data);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: remote_test basic|faults|cluster|put URL SEED N|get URL SEED N\n");
		return 1;
	}
	sink_start();
	int rc;
	if (!strcmp(argv[1], "basic"))
		rc = t_basic();
	else if (!strcmp(argv[1], "faults"))
		rc = t_faults();
	else if (!strcmp(argv[1], "cluster"))
		rc = t_cluster();
	else if ((!strcmp(argv[1], "put") || !strcmp(argv[1], "get")) && argc == 5)
		rc = t_putget(argv[1][0] == 'p', argv[2], strtoull(argv[3], NULL, 0),
			      (uint32_t)atoi(argv[4]));
	else {
		fprintf(stderr, "unknown command %s\n", argv[1]);
		rc = 1;
	}
	kvrt_actor_destroy(g_notify);
	pthread_mutex_lock(&g_sink.mu);
	free(g_sink.v);
	pthread_mutex_unlock(&g_sink.mu);
	if (rc == 77)
		return 77;
	if (rc || _fails) {
		fprintf(stderr, "remote_test %s: %d failure(s)\n", argv[1], _fails);
		return 1;
	}
	printf("remote_test %s: ok\n", argv[1]);
	return 0;
}
