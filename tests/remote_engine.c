/* tests/remote_engine.c: two engines (two processes) share chunks through
 * the remote tier (actors/remote.h wired into actors/evict.c, lookup.c).
 * A plain program (it needs a real redis-server), run by
 * tests/check-remote.sh:
 *
 *   remote_engine write URL SEED   an engine with remote_url saves a
 *       prompt's KV (full chunks and a tail) through the engine's save path,
 *       flushes, and waits until every chunk's write-behind is stored
 *   remote_engine read URL SEED hit    a new engine, empty local cache:
 *       the lookup finds the whole prompt as "loadable after prefetch", an
 *       async load brings it into freshly poisoned vLLM blocks (other blocks
 *       than the writer's), and the bytes equal the writer's, bitwise
 *   remote_engine read URL SEED safe   the same, but a miss or a load error
 *       is accepted (a corrupted value in Redis, a dead server): whatever is
 *       reported loaded must be exact, nothing else may change, and nothing
 *       may hang (the lookup answers within 250 ms)
 *   remote_engine read URL SEED partial   Redis holds chunks 0 and 1 only:
 *       32 tokens found and loaded; the lookup asked again reuses Redis's
 *       answer (one EXISTS round trip), but 50 ms on asks Redis again
 *   remote_engine write URL SEED full   the same, the full chunks only (as
 *       vLLM's prefill saves a prompt: no partial tail)
 *   remote_engine read URL SEED late   the reader starts before the writer
 *       (a P/D consumer before its producer, which writes the full chunks):
 *       looked up again while Redis holds less than them (a lookup 50 ms
 *       after a short answer asks Redis again), it finds and loads them
 *   remote_engine slow URL SEED    the reader's case while Redis sleeps
 *       (DEBUG SLEEP from another connection): the lookups answer "ask
 *       again" (-EINPROGRESS) at once, never waiting on Redis, then the
 *       local miss once remote_lookup_wait_ms passed (the connection is
 *       dropped after remote_timeout_ms); once Redis is back, lookups hit
 *   remote_engine key URL SEED I   print chunk I's Redis key (for redis-cli)
 *
 * Lookups are asked again while they answer -EINPROGRESS, as vLLM's
 * scheduler does on its next pass (every 0.5 ms here).
 *
 * Both processes derive the tokens and the KV from SEED. Exit 0 pass, 1 fail.
 */
#include <errno.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "actors/engine.h"
#include "actors/key.h"
#include "actors/remote.h"
#include "runtime/log.h"
#include "tests/test_kern_util.h"

#define CS 16u                 /* tokens per chunk */
#define NFULL 3u               /* full chunks */
#define TAIL 5u                /* tokens of the tail chunk */
#define T (NFULL * CS + TAIL)  /* prompt tokens */
#define NCHUNKS (NFULL + 1u)
#define REQ 0x1234u

static int _fails;
#define CHECK(cond, ...)                                                                \
	do {                                                                            \
		if (!(cond)) {                                                          \
			fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                   \
			fprintf(stderr, "\n");                                          \
			_fails++;                                                       \
		}                                                                       \
	} while (0)

static const struct kt_spec SPEC = {.layout = KVRT_KV_FLASH_ATTN, .order = KT_NHD, .layers = 3,
				    .nb = 64, .bs = 8, .heads = 2, .hs = 32, .elem = 2};

struct rig {
	struct kt_model m;
	struct kvrt_engine *e;
	uint64_t seed;
	uint64_t ns;           /* engine namespace (Redis keys) */
	uint64_t req_ns;       /* request key namespace */
	uint32_t tok[T];
	int32_t blk[(T + 7) / 8];
	uint32_t nblk;
};

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* The KV of (token t, layer l, kv, head h): hb bytes from the seed. */
static void pattern(uint64_t seed, uint32_t t, uint32_t l, uint32_t kv, uint32_t h, unsigned char *out,
		    size_t n)
{
	uint64_t s = mix64(seed ^ ((uint64_t)t << 32 | (uint64_t)l << 16 | kv << 8 | h));
	kt_fill(out, n, &s);
}

static int64_t slot_of(const struct rig *g, uint32_t t)
{
	return (int64_t)g->blk[t / SPEC.bs] * SPEC.bs + t % SPEC.bs;
}

static size_t head_bytes(void)
{
	return (size_t)SPEC.hs * SPEC.elem;
}

static int rig_up_wait(struct rig *g, const char *url, uint64_t seed, bool writer, uint32_t wait_ms)
{
	memset(g, 0, sizeof(*g));
	setenv("KVRT_DEVICE", "host", 1);
	g->seed = seed;
	g->ns = 0x7e57000000000000ull ^ seed;
	g->req_ns = mix64(seed ^ 0xabcdef);
	for (uint32_t t = 0; t < T; t++)
		g->tok[t] = (uint32_t)(mix64(seed * 1000003u + t) % 150000);
	g->nblk = (T + SPEC.bs - 1) / SPEC.bs;
	/* Writer and reader place the prompt in different blocks. */
	for (uint32_t i = 0; i < g->nblk; i++)
		g->blk[i] = writer ? (int32_t)(2 * i + 1) : (int32_t)(SPEC.nb - 1 - 3 * i);
	kt_model_init(&g->m, &SPEC);
	uint64_t rng = mix64(seed ^ (writer ? 1 : 2)) | 1;
	for (uint32_t i = 0; i < g->m.ntensors; i++) {
		g->m.base[i] = malloc(g->m.bytes);
		if (!g->m.base[i])
			return -ENOMEM;
		kt_fill(g->m.base[i], g->m.bytes, &rng);
	}
	kt_model_bind(&g->m);
	struct kvrt_engine_config cfg = {.chunk_size = CS, .cpu_bytes = 4u << 20, .namespace_hash = g->ns,
					 .save_unfull_chunk = true, .verify_checksums = true,
					 .remote_url = url, .remote_timeout_ms = 300,
					 .remote_lookup_wait_ms = wait_ms};
	int rc = kvrt_engine_create(&g->e, &cfg);
	if (rc)
		return rc;
	return kvrt_engine_register(g->e, g->m.t, g->m.ntensors, NULL);
}

/* remote_lookup_wait_ms 250: the default 5 ms is a production trade-off;
 * under ASan on a loaded CI machine Redis's answer took longer (a partial
 * hit was missed once). The lookups must still never block (lookup_passes
 * measures every call). */
static int rig_up(struct rig *g, const char *url, uint64_t seed, bool writer)
{
	return rig_up_wait(g, url, seed, writer, 250);
}

static uint64_t us_now(void)
{
	return kvrt_now_ns() / 1000;
}

/* Look up the prompt as vLLM's scheduler does: again on every pass (0.5
 * ms apart) while the answer is -EINPROGRESS, for up to limit_ms. *asks:
 * calls made, *slowest_us: the longest call. */
static int lookup_passes(struct rig *g, struct kvrt_lookup_result *res, uint64_t limit_ms, uint32_t *asks,
			 uint64_t *slowest_us)
{
	uint64_t t0 = us_now();
	int rc;
	*asks = 0;
	*slowest_us = 0;
	for (;;) {
		uint64_t a = us_now();
		rc = kvrt_engine_lookup(g->e, REQ, g->req_ns, g->tok, T, res);
		uint64_t d = us_now() - a;
		*slowest_us = d > *slowest_us ? d : *slowest_us;
		(*asks)++;
		if (rc != -EINPROGRESS || us_now() - t0 > limit_ms * 1000)
			return rc;
		struct timespec ts = {0, 500000};
		nanosleep(&ts, NULL);
	}
}

static void rig_down(struct rig *g)
{
	kvrt_engine_destroy(g->e);
	for (uint32_t i = 0; i < g->m.ntensors; i++)
		free(g->m.base[i]);
	kt_model_fini(&g->m);
}

static struct kvrt_plan_req plan_of(const struct rig *g)
{
	return (struct kvrt_plan_req){.req_id = REQ, .ns_hash = g->req_ns, .tokens = g->tok,
				      .num_tokens = T, .prompt_tokens = T, .block_ids = g->blk,
				      .num_blocks = g->nblk};
}

static int step(struct rig *g, struct kvrt_plan_req *r)
{
	struct kvrt_step_plan p = {.reqs = r, .num_reqs = 1};
	int rc = kvrt_engine_bind_step(g->e, &p);
	if (!rc)
		rc = kvrt_engine_start_load(g->e);
	for (uint32_t l = 0; !rc && l < SPEC.layers; l++) {
		rc = kvrt_engine_wait_layer(g->e, l);
		if (!rc)
			rc = kvrt_engine_save_layer(g->e, l);
	}
	if (!rc)
		rc = kvrt_engine_wait_save(g->e);
	return rc;
}

static uint64_t ms_now(void)
{
	return kvrt_now_ns() / 1000000u;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

static int do_write(const char *url, uint64_t seed, bool full_only)
{
	struct rig g;
	int rc = rig_up(&g, url, seed, true);
	if (rc) {
		fprintf(stderr, "FAIL: engine with %s: %d\n", url, rc);
		return 1;
	}
	size_t hb = head_bytes();
	for (uint32_t t = 0; t < T; t++)
		for (uint32_t l = 0; l < SPEC.layers; l++)
			for (uint32_t kv = 0; kv < 2; kv++)
				for (uint32_t h = 0; h < SPEC.heads; h++)
					pattern(seed, t, l, kv, h, kt_at(&g.m, l, kv, slot_of(&g, t), h), hb);
	struct kvrt_plan_req r = plan_of(&g);
	r.save_start = 0;
	r.save_end = full_only ? NFULL * CS : T;
	uint32_t nsaved = full_only ? NFULL : NCHUNKS;
	CHECK(step(&g, &r) == 0, "save step");
	CHECK(kvrt_engine_flush(g.e) == 0, "flush");
	struct kvrt_engine_stats st;
	uint64_t t0 = ms_now();
	do {
		kvrt_engine_stats(g.e, &st);
		if (st.remote_writes + st.remote_dropped >= nsaved)
			break;
		sleep_ms(2);
	} while (ms_now() - t0 < 10000);
	printf("write %s: saved %" PRIu64 " chunks, remote writes %" PRIu64 ", dropped %" PRIu64 "\n", url,
	       st.save_chunks, st.remote_writes, st.remote_dropped);
	CHECK(st.save_chunks == nsaved, "%" PRIu64 " chunks saved, want %u", st.save_chunks, nsaved);
	CHECK(st.remote_writes == nsaved, "%" PRIu64 " chunks written to Redis, want %u", st.remote_writes,
	      nsaved);
	CHECK(st.remote_dropped == 0, "%" PRIu64 " write-behinds dropped", st.remote_dropped);
	rig_down(&g);
	return _fails ? 1 : 0;
}

/* safe: a miss or load errors are fine, wrong bytes never are. partial:
 * Redis holds chunks 0 and 1 only (the test deleted chunk 2). */
static int do_read(const char *url, uint64_t seed, bool safe, bool partial, bool late)
{
	struct rig g;
	int rc = rig_up(&g, url, seed, false);
	if (rc) {
		fprintf(stderr, "FAIL: engine with %s: %d\n", url, rc);
		return 1;
	}
	/* The tensors are random (poison); keep their image. */
	unsigned char **img = calloc(g.m.ntensors, sizeof(*img));
	for (uint32_t i = 0; i < g.m.ntensors; i++) {
		img[i] = malloc(g.m.bytes);
		memcpy(img[i], g.m.base[i], g.m.bytes);
	}
	struct kvrt_lookup_result res;
	uint64_t t0 = ms_now(), slowest;
	uint32_t asks;
	rc = lookup_passes(&g, &res, 1000, &asks, &slowest);
	/* late: the writer starts after us (a P/D consumer before its
	 * producer): looked up again while the answer is short, for 10 s. */
	uint32_t late_asks = 0;
	while (late && (rc == -EINPROGRESS || (rc == 0 && res.tokens < NFULL * CS)) &&
	       ms_now() - t0 < 10000) {
		uint32_t a;
		uint64_t sl;
		sleep_ms(1);
		rc = lookup_passes(&g, &res, 1000, &a, &sl);
		late_asks += a;
	}
	uint64_t lookup_ms = ms_now() - t0;
	CHECK(rc == 0, "lookup: %d", rc);
	if (late)
		printf("late: found %u tokens after %" PRIu64 " ms, %u lookups\n", res.tokens, lookup_ms,
		       late_asks);
	else
		CHECK(lookup_ms < 250, "lookup answered after %" PRIu64 " ms", lookup_ms);
	CHECK(asks >= 2, "a local miss with a remote tier answered without asking Redis first");
	printf("read %s: lookup %u tokens (%u now) after %" PRIu64 " ms, %u asks, slowest %" PRIu64 " us\n",
	       url, res.tokens, res.tokens_now, lookup_ms, asks, slowest);
	uint32_t want_tok = partial ? 2 * CS : late ? NFULL * CS : T;
	uint32_t want_chunks = partial ? 2 : late ? NFULL : NCHUNKS;
	if (!safe) {
		CHECK(res.tokens == want_tok, "lookup found %u tokens of %u", res.tokens, want_tok);
		CHECK(res.tokens_now == 0, "%u tokens reported in the CPU tier of an empty cache",
		      res.tokens_now);
	}
	if (partial) {
		/* vLLM asks again next pass: Redis's answer is reused, not asked. */
		struct kvrt_lookup_result again;
		rc = lookup_passes(&g, &again, 1000, &asks, &slowest);
		CHECK(rc == 0 && asks == 1 && again.tokens == want_tok,
		      "asked again: %d after %u asks, %u tokens", rc, asks, again.tokens);
		/* Still looked up 50 ms after it took the short answer (a P/D
		 * consumer waiting for its producer's writes): Redis is asked
		 * again ("ask again" first), and answers the same. */
		sleep_ms(60);
		rc = lookup_passes(&g, &again, 1000, &asks, &slowest);
		CHECK(rc == 0 && asks >= 2 && again.tokens == want_tok,
		      "50 ms on: %d after %u asks, %u tokens", rc, asks, again.tokens);
	}
	uint32_t loaded = 0; /* tokens claimed loaded */
	int64_t errs[64];
	size_t nerr = 0;
	if (res.tokens) {
		struct kvrt_plan_req r = plan_of(&g);
		r.flags = KVRT_PLAN_ASYNC_LOAD;
		r.load_start = 0;
		r.load_end = res.tokens;
		r.load_hit = res.tokens;
		CHECK(step(&g, &r) == 0, "load step");
		uint64_t recv[4], failed[4];
		struct kvrt_finished fin = {.recving = recv, .recving_cap = 4, .failed = failed, .failed_cap = 4};
		bool done = false, bad = false;
		t0 = ms_now();
		while (!done && ms_now() - t0 < 10000) {
			kvrt_engine_get_finished(g.e, NULL, 0, &fin);
			for (uint32_t i = 0; i < fin.num_recving; i++)
				done |= recv[i] == REQ;
			for (uint32_t i = 0; i < fin.num_failed; i++)
				bad |= failed[i] == REQ;
			if (!done)
				sleep_ms(1);
		}
		CHECK(done, "the async load did not finish in 10 s");
		nerr = kvrt_engine_load_errors(g.e, errs, 64);
		if (!safe) {
			CHECK(!bad, "the async load failed");
			CHECK(nerr == 0, "%zu load-error blocks", nerr);
		}
		loaded = res.tokens;
		printf("read: async load %s, %zu error blocks\n", bad ? "failed" : "done", nerr);
	}
	CHECK(kvrt_engine_flush(g.e) == 0, "flush");
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	printf("read: remote finds %" PRIu64 " (late %" PRIu64 "), reads %" PRIu64 ", hits %" PRIu64
	       ", misses %" PRIu64 ", errors %" PRIu64 "\n",
	       st.remote_finds, st.remote_find_late, st.remote_reads, st.remote_hits, st.remote_misses,
	       st.remote_errors);
	if (!safe)
		CHECK(st.remote_hits == want_chunks, "%" PRIu64 " chunks read from Redis, want %u",
		      st.remote_hits, want_chunks);
	if (partial)
		CHECK(st.remote_finds == 2, "%" PRIu64 " asks of Redis, want 2 (one 50 ms on)",
		      st.remote_finds);
	/* Expected image: the poison, with every loaded token not in an error
	 * block holding the writer's KV. Error blocks are vLLM's to recompute:
	 * whatever they hold is not claimed, so copy them as they are. */
	size_t hb = head_bytes();
	unsigned char *want = malloc(hb);
	size_t exact = 0;
	for (uint32_t t = 0; t < loaded; t++) {
		int32_t b = g.blk[t / SPEC.bs];
		bool err = false;
		for (size_t i = 0; i < nerr; i++)
			err |= errs[i] == b;
		for (uint32_t l = 0; l < SPEC.layers; l++)
			for (uint32_t kv = 0; kv < 2; kv++)
				for (uint32_t h = 0; h < SPEC.heads; h++) {
					unsigned char *p = kt_at(&g.m, l, kv, slot_of(&g, t), h);
					unsigned char *q = img[l] + (p - g.m.base[l]);
					if (err) {
						memcpy(q, p, hb);
						continue;
					}
					pattern(seed, t, l, kv, h, want, hb);
					memcpy(q, want, hb);
					exact++;
				}
	}
	for (uint32_t i = 0; i < g.m.ntensors; i++) {
		size_t k = 0;
		while (k < g.m.bytes && img[i][k] == g.m.base[i][k])
			k++;
		CHECK(k == g.m.bytes, "layer %u differs from the expected image at byte %zu", i, k);
	}
	printf("read: %zu heads exact, %zu error blocks, rest untouched\n", exact, nerr);
	free(want);
	for (uint32_t i = 0; i < g.m.ntensors; i++)
		free(img[i]);
	free(img);
	rig_down(&g);
	return _fails ? 1 : 0;
}

struct sleeper {
	const char *host;
	int port;
	int rc;
};

static void *debug_sleep(void *arg)
{
	struct sleeper *z = arg;
	redisContext *c = redisConnect(z->host, z->port);
	z->rc = -1;
	if (c && !c->err) {
		redisReply *r = redisCommand(c, "DEBUG SLEEP 0.8");
		z->rc = r && r->type == REDIS_REPLY_STATUS ? 0 : -1;
		freeReplyObject(r);
	}
	redisFree(c);
	return NULL;
}

/* Redis asleep for 0.8 s: lookups must not wait for it. URL must be
 * redis://HOST:PORT (the sleeper connects there). */
static int do_slow(const char *url, uint64_t seed)
{
	char host[64];
	int port = 0;
	if (sscanf(url, "redis://%63[^:]:%d", host, &port) != 2) {
		fprintf(stderr, "FAIL: slow wants redis://HOST:PORT, not %s\n", url);
		return 1;
	}
	struct rig g;
	int rc = rig_up_wait(&g, url, seed, false, 150);
	if (rc) {
		fprintf(stderr, "FAIL: engine with %s: %d\n", url, rc);
		return 1;
	}
	struct sleeper z = {.host = host, .port = port};
	pthread_t th;
	CHECK(pthread_create(&th, NULL, debug_sleep, &z) == 0, "thread");
	sleep_ms(100); /* Redis is asleep now */
	struct kvrt_lookup_result res;
	uint64_t t0 = ms_now(), slowest;
	uint32_t asks;
	rc = lookup_passes(&g, &res, 2000, &asks, &slowest);
	uint64_t ms = ms_now() - t0;
	printf("slow: answer %d (%u tokens) after %" PRIu64 " ms, %u asks, slowest call %" PRIu64 " us\n", rc,
	       res.tokens, ms, asks, slowest);
	CHECK(rc == 0 && res.tokens == 0, "a local miss while Redis sleeps: %d, %u tokens", rc, res.tokens);
	CHECK(ms >= 140 && ms < 600, "answered after %" PRIu64 " ms (remote_lookup_wait_ms 150)", ms);
	CHECK(slowest < 50000, "a lookup blocked %" PRIu64 " us while Redis slept", slowest);
	pthread_join(th, NULL);
	CHECK(z.rc == 0, "DEBUG SLEEP failed (enable-debug-command?)");
	/* Awake (and reconnected): the lookups hit again. */
	t0 = ms_now();
	do {
		rc = lookup_passes(&g, &res, 1000, &asks, &slowest);
		if (rc == 0 && res.tokens == T)
			break;
		sleep_ms(5);
	} while (ms_now() - t0 < 3000);
	printf("slow: after Redis woke: %d, %u tokens\n", rc, res.tokens);
	CHECK(rc == 0 && res.tokens == T, "the late answer gave %u tokens of %u", res.tokens, T);
	kvrt_engine_release(g.e, REQ);
	CHECK(kvrt_engine_flush(g.e) == 0, "flush");
	rig_down(&g);
	return _fails ? 1 : 0;
}

static int do_key(uint64_t seed, uint32_t idx)
{
	uint64_t ns = 0x7e57000000000000ull ^ seed, req_ns = mix64(seed ^ 0xabcdef);
	uint32_t tok[T];
	for (uint32_t t = 0; t < T; t++)
		tok[t] = (uint32_t)(mix64(seed * 1000003u + t) % 150000);
	struct kvrt_chunk_key k = kvrt_key_root();
	for (uint32_t i = 0; i <= idx && i < NCHUNKS; i++)
		k = kvrt_key_chunk(req_ns, k, tok + (size_t)i * CS, i < NFULL ? CS : TAIL);
	char name[KVRT_REMOTE_KEY_BUF];
	kvrt_remote_key_name(ns, k, name);
	printf("%s\n", name);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && !strcmp(argv[1], "write"))
		return do_write(argv[2], strtoull(argv[3], NULL, 0), argc >= 5 && !strcmp(argv[4], "full"));
	if (argc >= 5 && !strcmp(argv[1], "read"))
		return do_read(argv[2], strtoull(argv[3], NULL, 0), !strcmp(argv[4], "safe"),
			       !strcmp(argv[4], "partial"), !strcmp(argv[4], "late"));
	if (argc >= 4 && !strcmp(argv[1], "slow"))
		return do_slow(argv[2], strtoull(argv[3], NULL, 0));
	if (argc >= 5 && !strcmp(argv[1], "key"))
		return do_key(strtoull(argv[3], NULL, 0), (uint32_t)strtoul(argv[4], NULL, 0));
	fprintf(stderr, "usage: remote_engine write URL SEED [full] | read URL SEED hit|safe|partial|late | slow URL SEED | "
			"key URL SEED I\n");
	return 2;
}
