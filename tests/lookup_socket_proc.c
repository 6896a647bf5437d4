/* tests/lookup_socket_proc.c: the lookup socket across two processes,
 * through connector/kvrt.h only (run by tests/check-lookup-socket.sh).
 *
 *   lookup_socket_proc serve INSTANCE READYFILE PINSFILE
 *       a worker serving its lookup socket and, to plan the saves, a
 *       scheduler of the same instance in the same process (it reads the
 *       index directly); saves one 40-token prompt (32 tokens in whole
 *       chunks), touches READYFILE, then writes the pins it holds to
 *       PINSFILE every 10 ms until killed.
 *   lookup_socket_proc lookup INSTANCE EXPECT MAX_MS
 *       a scheduler alone (no worker in this process): looks the prompt up
 *       and exits 0 when it matched EXPECT tokens within MAX_MS, else 1.
 *   lookup_socket_proc preempt INSTANCE PINSFILE
 *       a scheduler alone: the lookup pins the prompt's 2 chunks on the
 *       worker; a step that lists the request as preempted releases them
 *       there (PINSFILE back to 0 within 2 s), exit 0; else 1.
 *
 * Both use tp_size 1 with KVRT_LOOKUP_SOCKET=1 (set by the script), so the
 * one rank's socket is rank0.sock under $XDG_RUNTIME_DIR/kvrt/INSTANCE.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connector/kvrt.h"
#include "runtime/common.h"

#define NB 16u
#define BS 16u
#define H 2u
#define D 8u
#define T 40u

static const char *K[] = {"chunk_size", "max_local_cpu_size", "device"};
static const char *V[] = {"16", "0.01", "host"};

static struct kvrt_options opts(const char *inst)
{
	return (struct kvrt_options){.instance = inst, .model_id = "tiny", .dtype = "float32",
				     .block_size = BS, .keys = K, .values = V, .num_keys = 3};
}

/* A scheduler handle of instance inst (NULL: the reason on stderr). */
static struct kvrt_sched *sched_up(const char *inst)
{
	char err[256];
	struct kvrt_options o = opts(inst);
	struct kvrt_sched *s;
	if (kvrt_sched_create(&s, &o, err, sizeof err)) {
		fprintf(stderr, "%s\n", err);
		return NULL;
	}
	return s;
}

static void prompt(uint32_t *tok)
{
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 5000 + i * 13;
}

static struct kvrt_request req(const char *id, const uint32_t *tok)
{
	return (struct kvrt_request){.id = id, .id_len = (uint32_t)strlen(id), .tokens = tok,
				     .num_tokens = T, .total_tokens = T, .prompt_tokens = T};
}

#define CHECK(x)                                                                   \
	do {                                                                       \
		if (!(x)) {                                                        \
			fprintf(stderr, "lookup_socket_proc: %s failed (line %d)\n", #x, __LINE__); \
			return 1;                                                  \
		}                                                                  \
	} while (0)

static int step(struct kvrt_worker *w, const void *m, size_t len)
{
	CHECK(kvrt_worker_bind(w, m, len) == 0);
	CHECK(kvrt_worker_start_load(w) == 0);
	for (uint32_t l = 0; l < 2; l++) {
		CHECK(kvrt_worker_wait_layer(w, l) == 0);
		CHECK(kvrt_worker_save_layer(w, l) == 0);
	}
	CHECK(kvrt_worker_wait_save(w) == 0);
	return 0;
}

/* The pins the worker process holds, as PINSFILE says (-1: unreadable). */
static long pins_file(const char *path)
{
	FILE *f = fopen(path, "r");
	long v = -1;
	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

static bool pins_become(const char *path, long want, uint32_t max_ms)
{
	for (uint32_t i = 0; i < max_ms / 10; i++) {
		if (pins_file(path) == want)
			return true;
		usleep(10000);
	}
	return pins_file(path) == want;
}

static int serve(const char *inst, const char *ready, const char *pins)
{
	char err[256];
	struct kvrt_options o = opts(inst);
	static float kv[2][NB * H * BS * 2 * D];
	uint64_t x = 0x9e3779b97f4a7c15ull;
	struct kvrt_tensor t[2];
	for (int l = 0; l < 2; l++) {
		for (size_t i = 0; i < sizeof kv[l] / sizeof kv[l][0]; i++) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			kv[l][i] = (float)(x % 100000) + 1.0f;
		}
		t[l] = (struct kvrt_tensor){.data = kv[l], .layout = KVRT_LAYOUT_BHNC, .elem_size = 4, .ndim = 4,
					    .shape = {NB, H, BS, 2 * D},
					    .stride = {H * BS * 2 * D, BS * 2 * D, 2 * D, 1}};
	}
	struct kvrt_worker *w;
	struct kvrt_sched *s;
	if (kvrt_worker_create(&w, &o, err, sizeof err)) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	CHECK(kvrt_worker_register(w, t, 2) == 0);
	CHECK(kvrt_sched_create(&s, &o, err, sizeof err) == 0);
	uint32_t tok[T];
	prompt(tok);
	struct kvrt_request a = req("A", tok);
	int32_t blk[3] = {1, 2, 3};
	uint32_t n;
	bool as;
	CHECK(kvrt_sched_lookup(s, &a, 0, &n, &as) == 0 && n == 0);
	CHECK(kvrt_sched_after_alloc(s, &a, blk, 3, 0, 0) == 0);
	struct kvrt_sched_req sr = {.req = a, .num_computed = T, .block_ids = blk, .num_blocks = 3};
	const void *m;
	size_t len;
	CHECK(kvrt_sched_build_meta(s, &(struct kvrt_sched_step){&sr, 1, NULL, 0}, &m, &len) == 0);
	CHECK(step(w, m, len) == 0);
	bool delay;
	CHECK(kvrt_sched_finished(s, "A", 1, &delay) == 0);
	CHECK(kvrt_sched_build_meta(s, &(struct kvrt_sched_step){0}, &m, &len) == 0);
	CHECK(step(w, m, len) == 0);
	CHECK(kvrt_worker_flush(w) == 0);
	kvrt_sched_destroy(s);
	FILE *f = fopen(ready, "w");
	CHECK(f != NULL);
	fclose(f);
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", pins);
	for (;;) { /* until killed */
		struct kvrt_stats st;
		kvrt_worker_stats(w, &st);
		if ((f = fopen(tmp, "w"))) {
			fprintf(f, "%llu\n", (unsigned long long)st.pinned);
			fclose(f);
			rename(tmp, pins);
		}
		usleep(10000);
	}
}

static int preempt(const char *inst, const char *pins)
{
	struct kvrt_sched *s = sched_up(inst);
	if (!s)
		return 1;
	uint32_t tok[T];
	prompt(tok);
	struct kvrt_request b = req("B", tok);
	uint32_t n = 0;
	bool as;
	CHECK(kvrt_sched_lookup(s, &b, 0, &n, &as) == 0 && n == 32);
	CHECK(pins_become(pins, 2, 2000));
	/* vLLM preempted B before it was scheduled with its hit. */
	struct kvrt_bytes pre = {"B", 1};
	const void *m;
	size_t len;
	CHECK(kvrt_sched_build_meta(s, &(struct kvrt_sched_step){NULL, 0, &pre, 1}, &m, &len) == 0);
	bool released = pins_become(pins, 0, 2000);
	bool fin;
	CHECK(kvrt_sched_finished(s, "B", 1, &fin) == 0);
	kvrt_sched_destroy(s);
	printf("preempt: the worker's pins %s\n", released ? "released" : "still held after 2 s");
	return released ? 0 : 1;
}

static int lookup(const char *inst, uint32_t expect, uint32_t max_ms)
{
	struct kvrt_sched *s = sched_up(inst);
	if (!s)
		return 1;
	CHECK(!kvrt_sched_sees_worker(s));
	uint32_t tok[T];
	prompt(tok);
	struct kvrt_request b = req("B", tok);
	uint32_t n = 12345;
	bool as;
	uint64_t t0 = kvrt_now_ns();
	CHECK(kvrt_sched_lookup(s, &b, 0, &n, &as) == 0);
	uint64_t ms = (kvrt_now_ns() - t0) / 1000000;
	bool fin;
	CHECK(kvrt_sched_finished(s, "B", 1, &fin) == 0);
	kvrt_sched_destroy(s);
	printf("lookup: %u tokens in %llu ms (want %u within %u ms)\n", n, (unsigned long long)ms, expect,
	       max_ms);
	return n == expect && ms <= max_ms ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "serve"))
		return serve(argv[2], argv[3], argv[4]);
	if (argc == 4 && !strcmp(argv[1], "preempt"))
		return preempt(argv[2], argv[3]);
	if (argc == 5 && !strcmp(argv[1], "lookup"))
		return lookup(argv[2], (uint32_t)strtoul(argv[3], NULL, 10), (uint32_t)strtoul(argv[4], NULL, 10));
	fprintf(stderr, "usage: %s serve INSTANCE READYFILE PINSFILE | lookup INSTANCE EXPECT MAX_MS | "
			"preempt INSTANCE PINSFILE\n", argv[0]);
	return 2;
}
