/* tests/test_lookup_socket.c: connector/lookup_socket.h: the frame codec
 * (round trips; every truncation and every bad header refused), a server
 * answering a real engine's lookups from a saved prompt, two ranks that
 * hold different amounts (the minimum), a rank that is not there and one
 * that never answers (no hit, within the timeout, never a hang), a stale
 * socket replaced, a live one kept, 0600 sockets in 0700 directories, and
 * malformed or truncated frames closing only their connection, and a
 * rank's "ask again" (a remote tier asking Redis) relayed. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <utime.h>

#include "connector/lookup_socket.h"
#include "tests/test_pipeline_util.h"

static const struct kt_spec SPEC = {.layout = KVRT_KV_FLASH_ATTN, .order = KT_NHD, .layers = 2,
				    .nb = 64, .bs = 16, .heads = 2, .hs = 8, .elem = 2};

static struct kvrt_engine_config cfg16(void)
{
	return (struct kvrt_engine_config){.chunk_size = 16, .cpu_bytes = 4u << 20, .step_tokens = 64};
}

static void tmpdir(char *buf, size_t cap)
{
	snprintf(buf, cap, "/tmp/kvrt-lsock-test.XXXXXX");
	cr_assert_not_null(mkdtemp(buf));
}

static void rmtree(const char *d)
{
	char cmd[256];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
	cr_assert_eq(system(cmd), 0);
}

/* Wait (bounded) until the server's counter reaches want. */
static uint64_t wait_stat(struct kvrt_lsock_server *s, size_t off, uint64_t want)
{
	struct kvrt_lsock_server_stats st;
	uint64_t v = 0;
	for (int i = 0; i < 2000; i++) {
		kvrt_lsock_server_stats(s, &st);
		memcpy(&v, (const char *)&st + off, sizeof v);
		if (v >= want)
			break;
		usleep(1000);
	}
	return v;
}

/* A server for g's engine in a fresh directory d (char[64]) and a client
 * of it (2 s timeout). */
static void one_rank(struct prig *g, char *d, struct kvrt_lsock_server **srv,
		     struct kvrt_lsock_client **c)
{
	char path[128];
	tmpdir(d, 64);
	snprintf(path, sizeof path, "%s/rank0.sock", d);
	cr_assert_eq(kvrt_lsock_server_start(srv, g->e, path), 0);
	const char *paths[] = {path};
	cr_assert_eq(kvrt_lsock_client_create(c, paths, 1, 2000), 0);
}

static int raw_connect(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	cr_assert_geq(fd, 0);
	cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
	return fd;
}

Test(lookup_socket, codec_round_trip_and_rejections)
{
	uint64_t rng = 0x77;
	uint32_t tok[37];
	for (uint32_t i = 0; i < 37; i++)
		tok[i] = (uint32_t)kvrt_test_rand(&rng);
	uint8_t b[512], c[512];
	memset(b, 0xa5, sizeof b);
	size_t n = kvrt_lsock_encode_lookup(b, sizeof b, 9, 0x1234, 0xabcdef, tok, 37);
	cr_assert_eq(n, KVRT_LSOCK_HDR + 28 + 4 * 37);
	cr_assert_eq(kvrt_lsock_encode_lookup(b, n - 1, 9, 1, 2, tok, 37), 0, "must not overflow");
	struct kvrt_lsock_frame f;
	size_t total;
	cr_assert_eq(kvrt_lsock_frame_size(b, n, &total), 0);
	cr_assert_eq(total, n);
	cr_assert_eq(kvrt_lsock_decode(b, n, &f), 0);
	cr_assert(f.type == KVRT_LSOCK_LOOKUP && f.seq == 9 && f.req_id == 0x1234 && f.ns_hash == 0xabcdef &&
		  f.num_tokens == 37);
	cr_assert(!memcmp(f.tokens, tok, sizeof tok));
	/* Every truncation: incomplete by its header, never a whole frame. */
	for (size_t l = 0; l < n; l++) {
		int rc = kvrt_lsock_frame_size(b, l, &total);
		if (l < KVRT_LSOCK_HDR)
			cr_assert_eq(rc, -EAGAIN, "prefix %zu", l);
		else
			cr_assert(!rc && total > l, "prefix %zu", l);
		cr_assert_eq(kvrt_lsock_decode(b, l, &f), -EBADMSG, "prefix %zu decoded", l);
	}
	cr_assert_eq(kvrt_lsock_decode(b, n + 1, &f), -EBADMSG, "trailing byte");
	/* Every bad header field. */
	for (int k = 0; k < 4; k++) {
		memcpy(c, b, n);
		c[k] ^= 0x20;
		cr_assert_eq(kvrt_lsock_frame_size(c, n, &total), -EBADMSG, "magic byte %d", k);
		cr_assert_eq(kvrt_lsock_decode(c, n, &f), -EBADMSG);
	}
	uint16_t bad16[] = {0, 2, 0xffff};
	for (int k = 0; k < 3; k++) {
		memcpy(c, b, n);
		memcpy(c + 4, &bad16[k], 2);
		cr_assert_eq(kvrt_lsock_frame_size(c, n, &total), -EBADMSG, "version %u", bad16[k]);
		memcpy(c, b, n);
		uint16_t t = bad16[k] == 2 ? 4 : bad16[k];
		memcpy(c + 6, &t, 2);
		cr_assert_eq(kvrt_lsock_frame_size(c, n, &total), -EBADMSG, "type %u", t);
	}
	uint32_t bad32[] = {0, 27, 29, 28 + 4 * (KVRT_LSOCK_MAX_TOKENS + 1), 0xffffffffu};
	for (int k = 0; k < 5; k++) {
		memcpy(c, b, n);
		memcpy(c + 8, &bad32[k], 4);
		cr_assert_eq(kvrt_lsock_frame_size(c, n, &total), -EBADMSG, "length %u", bad32[k]);
	}
	/* A length that fits its type but not its count, both ways. */
	memcpy(c, b, n);
	uint32_t l4 = 28 + 4 * 36;
	memcpy(c + 8, &l4, 4);
	cr_assert_eq(kvrt_lsock_decode(c, n - 4, &f), -EBADMSG, "count beyond length");
	memcpy(c, b, n);
	uint32_t cnt = 36;
	memcpy(c + KVRT_LSOCK_HDR + 24, &cnt, 4);
	cr_assert_eq(kvrt_lsock_decode(c, n, &f), -EBADMSG, "count short of length");
	cr_assert_eq(kvrt_lsock_encode_lookup(b, sizeof b, 1, 1, 1, tok, KVRT_LSOCK_MAX_TOKENS + 1), 0);
	/* Release and answer. */
	n = kvrt_lsock_encode_release(b, sizeof b, 0x55aa);
	cr_assert_eq(n, KVRT_LSOCK_RELEASE_BYTES);
	cr_assert(!kvrt_lsock_decode(b, n, &f) && f.type == KVRT_LSOCK_RELEASE && f.req_id == 0x55aa);
	for (size_t l = 0; l < n; l++)
		cr_assert_eq(kvrt_lsock_decode(b, l, &f), -EBADMSG);
	struct kvrt_lookup_result r = {.tokens_now = 32, .tokens = 48, .chunks_now = 2, .chunks = 3};
	n = kvrt_lsock_encode_answer(b, sizeof b, 77, -EAGAIN, &r);
	cr_assert_eq(n, KVRT_LSOCK_ANSWER_BYTES);
	cr_assert_eq(kvrt_lsock_decode(b, n, &f), 0);
	cr_assert(f.type == KVRT_LSOCK_ANSWER && f.seq == 77 && f.status == -EAGAIN && f.res.tokens_now == 32 &&
		  f.res.tokens == 48 && f.res.chunks_now == 2 && f.res.chunks == 3);
	for (size_t l = 0; l < n; l++)
		cr_assert_eq(kvrt_lsock_decode(b, l, &f), -EBADMSG);
	r.tokens_now = 49; /* more now than at all: not an answer */
	n = kvrt_lsock_encode_answer(b, sizeof b, 77, 0, &r);
	cr_assert_eq(kvrt_lsock_decode(b, n, &f), -EBADMSG);
}

Test(lookup_socket, paths_are_private)
{
	char d[64], p[128];
	tmpdir(d, sizeof d);
	const char *old = getenv("XDG_RUNTIME_DIR");
	char *saved = old ? strdup(old) : NULL;
	setenv("XDG_RUNTIME_DIR", d, 1);
	cr_assert_eq(kvrt_lsock_path(p, sizeof p, "engine-0.a_b", 3, true), 0);
	char want[128];
	snprintf(want, sizeof want, "%s/kvrt/engine-0.a_b/rank3.sock", d);
	cr_assert_str_eq(p, want);
	struct stat st;
	snprintf(want, sizeof want, "%s/kvrt", d);
	cr_assert(!stat(want, &st) && (st.st_mode & 0777) == 0700);
	snprintf(want, sizeof want, "%s/kvrt/engine-0.a_b", d);
	cr_assert(!stat(want, &st) && (st.st_mode & 0777) == 0700);
	/* Odd instances are hashed (no '/', no "..", bounded length). */
	cr_assert_eq(kvrt_lsock_path(p, sizeof p, "../x/y", 0, false), 0);
	cr_assert_null(strstr(p, ".."));
	cr_assert_eq(kvrt_lsock_path(p, sizeof p, "", 0, false), 0);
	char again[128];
	cr_assert_eq(kvrt_lsock_path(again, sizeof again, "", 0, false), 0);
	cr_assert_str_eq(p, again);
	/* A directory others can enter is refused. */
	snprintf(want, sizeof want, "%s/kvrt/open", d);
	cr_assert_eq(mkdir(want, 0755), 0);
	cr_assert_eq(chmod(want, 0755), 0);
	cr_assert_eq(kvrt_lsock_path(p, sizeof p, "open", 0, true), -EPERM);
	/* Too long for a sockaddr_un. */
	char longdir[200];
	memset(longdir, 'x', sizeof longdir - 1);
	longdir[0] = '/';
	longdir[sizeof longdir - 1] = '\0';
	setenv("XDG_RUNTIME_DIR", longdir, 1);
	cr_assert_eq(kvrt_lsock_path(p, sizeof p, "i", 0, false), -ENAMETOOLONG);
	if (saved)
		setenv("XDG_RUNTIME_DIR", saved, 1);
	else
		unsetenv("XDG_RUNTIME_DIR");
	free(saved);
	rmtree(d);
}

Test(lookup_socket, server_answers_a_saved_prompt)
{
	struct prig g;
	prig_up(&g, &SPEC, cfg16(), 11);
	struct preq a, other;
	preq_make(&g, &a, 1, 3 * 16 + 5, NULL, 0);
	preq_make(&g, &other, 2, 40, NULL, 0);
	struct preq *r[] = {&a};
	prig_save(&g, r, 1);
	char d[64], path[128];
	tmpdir(d, sizeof d);
	snprintf(path, sizeof path, "%s/rank0.sock", d);
	struct kvrt_lsock_server *srv;
	cr_assert_eq(kvrt_lsock_server_start(&srv, g.e, path), 0);
	struct stat st;
	cr_assert_eq(stat(path, &st), 0);
	cr_assert(S_ISSOCK(st.st_mode));
	cr_assert_eq(st.st_mode & 0777, 0600, "socket mode %o", st.st_mode & 0777);
	/* A second server on a live socket is refused; a regular file is kept. */
	struct kvrt_lsock_server *dup;
	cr_assert_eq(kvrt_lsock_server_start(&dup, g.e, path), -EADDRINUSE);
	char fpath[128];
	snprintf(fpath, sizeof fpath, "%s/file", d);
	FILE *fp = fopen(fpath, "w");
	cr_assert_not_null(fp);
	fclose(fp);
	cr_assert_eq(kvrt_lsock_server_start(&dup, g.e, fpath), -EEXIST);

	const char *paths[] = {path};
	struct kvrt_lsock_client *c;
	cr_assert_eq(kvrt_lsock_client_create(&c, paths, 1, 2000), 0);
	struct kvrt_lookup_result res;
	memset(&res, 0xee, sizeof res);
	cr_assert_eq(kvrt_lsock_client_lookup(c, 100, g.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 48u, "three whole chunks (no tail saved)");
	cr_assert_eq(res.tokens_now, 48u);
	cr_assert_eq(res.chunks, 3u);
	memset(&res, 0xee, sizeof res);
	cr_assert_eq(kvrt_lsock_client_lookup(c, 101, g.ns, other.tok, other.T, &res), 0);
	cr_assert_eq(res.tokens, 0u, "other tokens miss");
	cr_assert_eq(kvrt_lsock_client_lookup(c, 102, g.ns ^ 1, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 0u, "another namespace misses");
	struct kvrt_engine_stats es;
	kvrt_engine_stats(g.e, &es);
	cr_assert_eq(es.pinned, 3u, "request 100 pins its three chunks");
	kvrt_lsock_client_release(c, 100);
	cr_assert_eq(wait_stat(srv, offsetof(struct kvrt_lsock_server_stats, releases), 1), 1u);
	kvrt_engine_stats(g.e, &es);
	cr_assert_eq(es.pinned, 0u, "the release reached the engine");

	/* Garbage, a truncated frame, an oversized length: each closes only its
	 * own connection, counted; the client goes on. */
	int fd = raw_connect(path);
	cr_assert_eq(write(fd, "GET / HTTP/1.0\r\n\r\n", 18), 18);
	char x;
	cr_assert_eq(read(fd, &x, 1), 0, "closed by the server");
	close(fd);
	uint8_t b[512];
	size_t n = kvrt_lsock_encode_lookup(b, sizeof b, 1, 5, g.ns, a.tok, 20);
	fd = raw_connect(path);
	cr_assert_eq(write(fd, b, n - 3), (ssize_t)(n - 3));
	close(fd);
	uint32_t huge = 0xfffffff0u;
	memcpy(b + 8, &huge, 4);
	fd = raw_connect(path);
	cr_assert_eq(write(fd, b, KVRT_LSOCK_HDR), (ssize_t)KVRT_LSOCK_HDR);
	cr_assert_eq(read(fd, &x, 1), 0, "closed by the server");
	close(fd);
	cr_assert_eq(wait_stat(srv, offsetof(struct kvrt_lsock_server_stats, malformed), 3), 3u);
	cr_assert_eq(kvrt_lsock_client_lookup(c, 103, g.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 48u);
	kvrt_lsock_client_release(c, 103);
	/* Two frames in one write are both served. */
	fd = raw_connect(path);
	n = kvrt_lsock_encode_lookup(b, sizeof b, 7, 104, g.ns, a.tok, 32);
	size_t n2 = kvrt_lsock_encode_release(b + n, sizeof b - n, 104);
	cr_assert_eq(write(fd, b, n + n2), (ssize_t)(n + n2));
	uint8_t ans[KVRT_LSOCK_ANSWER_BYTES];
	size_t got = 0;
	while (got < sizeof ans) {
		ssize_t k = read(fd, ans + got, sizeof ans - got);
		cr_assert_gt(k, 0);
		got += (size_t)k;
	}
	struct kvrt_lsock_frame f;
	cr_assert_eq(kvrt_lsock_decode(ans, sizeof ans, &f), 0);
	cr_assert(f.seq == 7 && f.status == 0 && f.res.tokens == 32);
	close(fd);
	cr_assert_geq(wait_stat(srv, offsetof(struct kvrt_lsock_server_stats, releases), 3), 3u);
	kvrt_engine_stats(g.e, &es);
	cr_assert_eq(es.pinned, 0u);

	kvrt_lsock_client_destroy(c);
	kvrt_lsock_server_stop(srv);
	cr_assert_neq(access(path, F_OK), 0, "the socket is unlinked");
	preq_fini(&g, &a);
	preq_fini(&g, &other);
	prig_down(&g);
	rmtree(d);
}

/* vLLM's /reset_prefix_cache?reset_external=true on a server whose worker
 * is in another process: the scheduler's reset reaches the rank's cache
 * over its socket (before, it answered false and reset nothing). */
Test(lookup_socket, reset_reaches_the_rank)
{
	struct prig g;
	prig_up(&g, &SPEC, cfg16(), 12);
	struct preq a, b;
	preq_make(&g, &a, 1, 3 * 16, NULL, 0);
	preq_make(&g, &b, 2, 2 * 16, NULL, 0);
	struct preq *r[] = {&a, &b};
	prig_save(&g, r, 2);
	uint8_t buf[64];
	struct kvrt_lsock_frame f;
	size_t n = kvrt_lsock_encode_reset(buf, sizeof buf, 42);
	cr_assert_eq(n, KVRT_LSOCK_HDR + 8u);
	cr_assert_eq(kvrt_lsock_encode_reset(buf, n - 1, 42), 0, "must not overflow");
	cr_assert_eq(kvrt_lsock_decode(buf, n, &f), 0);
	cr_assert(f.type == KVRT_LSOCK_RESET && f.seq == 42);
	cr_assert_eq(kvrt_lsock_decode(buf, n - 1, &f), -EBADMSG);

	char d[64];
	struct kvrt_lsock_server *srv;
	struct kvrt_lsock_client *c;
	one_rank(&g, d, &srv, &c);
	struct kvrt_lookup_result res;
	/* b is pinned by a lookup in flight: kept; a is dropped. */
	cr_assert_eq(kvrt_lsock_client_lookup(c, 200, g.ns, b.tok, b.T, &res), 0);
	cr_assert_eq(res.tokens, 32u);
	uint64_t dropped = 99, kept = 99;
	cr_assert_eq(kvrt_lsock_client_reset(c, 5000, &dropped, &kept), 0);
	cr_assert_eq(dropped, 3u, "a's three chunks");
	cr_assert_eq(kept, 2u, "b's two pinned chunks");
	cr_assert_eq(wait_stat(srv, offsetof(struct kvrt_lsock_server_stats, resets), 1), 1u);
	cr_assert_eq(kvrt_lsock_client_lookup(c, 201, g.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 0u, "a is gone");
	kvrt_lsock_client_release(c, 201);
	kvrt_lsock_client_release(c, 200);
	cr_assert_eq(wait_stat(srv, offsetof(struct kvrt_lsock_server_stats, releases), 2), 2u);
	cr_assert_eq(kvrt_lsock_client_reset(c, 5000, &dropped, &kept), 0);
	cr_assert(dropped == 2 && kept == 0, "b dropped once unpinned: %llu %llu",
		  (unsigned long long)dropped, (unsigned long long)kept);
	cr_assert_eq(kvrt_lsock_client_lookup(c, 202, g.ns, b.tok, b.T, &res), 0);
	cr_assert_eq(res.tokens, 0u);
	kvrt_lsock_client_release(c, 202);
	/* A rank that is gone: the reset says so. */
	kvrt_lsock_server_stop(srv);
	cr_assert_eq(kvrt_lsock_client_reset(c, 500, &dropped, &kept), -EHOSTDOWN);
	kvrt_lsock_client_destroy(c);
	preq_fini(&g, &a);
	preq_fini(&g, &b);
	prig_down(&g);
	rmtree(d);
}

Test(lookup_socket, two_ranks_minimum_dead_and_silent_ranks)
{
	struct prig g0, g1;
	prig_up(&g0, &SPEC, cfg16(), 21);
	prig_up(&g1, &SPEC, cfg16(), 21); /* same namespace */
	struct preq a, b;
	preq_make(&g0, &a, 1, 4 * 16, NULL, 0);
	preq_make(&g1, &b, 1, 2 * 16, &a, 2 * 16); /* a's first two chunks */
	struct preq *r0[] = {&a}, *r1[] = {&b};
	prig_save(&g0, r0, 1);
	prig_save(&g1, r1, 1);
	char d[64], p0[128], p1[128];
	tmpdir(d, sizeof d);
	snprintf(p0, sizeof p0, "%s/rank0.sock", d);
	snprintf(p1, sizeof p1, "%s/rank1.sock", d);
	struct kvrt_lsock_server *s0, *s1;
	cr_assert_eq(kvrt_lsock_server_start(&s0, g0.e, p0), 0);
	cr_assert_eq(kvrt_lsock_server_start(&s1, g1.e, p1), 0);
	const char *paths[] = {p0, p1};
	struct kvrt_lsock_client *c;
	cr_assert_eq(kvrt_lsock_client_create(&c, paths, 2, 300), 0);
	struct kvrt_lookup_result res;
	cr_assert_eq(kvrt_lsock_client_lookup(c, 7, g0.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 32u, "the minimum over ranks");
	cr_assert_eq(res.chunks, 2u);
	kvrt_lsock_client_release(c, 7);

	/* Rank 1 goes away: no socket at all. No hit, at once. */
	kvrt_lsock_server_stop(s1);
	uint64_t t0 = kvrt_now_ns();
	cr_assert_neq(kvrt_lsock_client_lookup(c, 8, g0.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 0u);
	cr_assert_lt(kvrt_now_ns() - t0, 300000000ull, "a missing rank costs no timeout");
	kvrt_lsock_client_release(c, 8);

	/* Rank 1 accepts (the backlog does) but never answers. */
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	memcpy(sa.sun_path, p1, strlen(p1) + 1);
	cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
	cr_assert_eq(listen(fd, 8), 0);
	t0 = kvrt_now_ns();
	cr_assert_neq(kvrt_lsock_client_lookup(c, 9, g0.ns, a.tok, a.T, &res), 0);
	uint64_t dt = kvrt_now_ns() - t0;
	cr_assert_eq(res.tokens, 0u);
	cr_assert_geq(dt, 290000000ull, "waited its timeout");
	cr_assert_lt(dt, 3000000000ull, "but not much longer");
	/* Backed off: the next lookup answers no hit without waiting. */
	t0 = kvrt_now_ns();
	cr_assert_neq(kvrt_lsock_client_lookup(c, 10, g0.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 0u);
	cr_assert_lt(kvrt_now_ns() - t0, 200000000ull);
	kvrt_lsock_client_release(c, 9);
	kvrt_lsock_client_release(c, 10);
	kvrt_lsock_client_destroy(c);

	/* The silent listener dies, leaving its file: a new server replaces it. */
	close(fd);
	cr_assert_eq(access(p1, F_OK), 0);
	cr_assert_eq(kvrt_lsock_server_start(&s1, g1.e, p1), 0);
	cr_assert_eq(kvrt_lsock_client_create(&c, paths, 2, 2000), 0);
	cr_assert_eq(kvrt_lsock_client_lookup(c, 11, g0.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 32u);
	kvrt_lsock_client_release(c, 11);
	cr_assert_geq(wait_stat(s1, offsetof(struct kvrt_lsock_server_stats, releases), 1), 1u);
	cr_assert_geq(wait_stat(s0, offsetof(struct kvrt_lsock_server_stats, releases), 5), 5u);
	kvrt_lsock_client_destroy(c);
	kvrt_lsock_server_stop(s0);
	kvrt_lsock_server_stop(s1);
	struct kvrt_engine_stats es;
	kvrt_engine_stats(g0.e, &es);
	cr_assert_eq(es.pinned, 0u);
	kvrt_engine_stats(g1.e, &es);
	cr_assert_eq(es.pinned, 0u);
	preq_fini(&g0, &a);
	preq_fini(&g1, &b);
	prig_down(&g0);
	prig_down(&g1);
	rmtree(d);
}

/* A rank with a remote tier asks Redis on a local miss and answers "ask
 * again": the client relays -EINPROGRESS (the rank is not marked down),
 * and the next ask gets the answer (Redis is not there: a miss). */
Test(lookup_socket, ask_again_is_relayed)
{
	struct kvrt_engine_config cfg = cfg16();
	cfg.remote_url = "redis://127.0.0.1:1"; /* nothing listens: the ask fails at once */
	cfg.remote_timeout_ms = 200;
	struct prig g;
	prig_up(&g, &SPEC, cfg, 12);
	struct preq a;
	preq_make(&g, &a, 1, 40, NULL, 0);
	char d[64];
	struct kvrt_lsock_server *srv;
	struct kvrt_lsock_client *c;
	one_rank(&g, d, &srv, &c);
	struct kvrt_lookup_result res;
	memset(&res, 0xee, sizeof res);
	cr_assert_eq(kvrt_lsock_client_lookup(c, 100, g.ns, a.tok, a.T, &res), -EINPROGRESS);
	cr_assert_eq(res.tokens, 0u);
	int rc = -EINPROGRESS;
	for (int i = 0; i < 200 && rc == -EINPROGRESS; i++) {
		usleep(1000);
		rc = kvrt_lsock_client_lookup(c, 100, g.ns, a.tok, a.T, &res);
	}
	cr_assert_eq(rc, 0, "the rank answered after its ask: %d", rc);
	cr_assert_eq(res.tokens, 0u, "a miss");
	kvrt_lsock_client_release(c, 100);
	kvrt_lsock_client_destroy(c);
	kvrt_lsock_server_stop(srv);
	preq_fini(&g, &a);
	prig_down(&g);
	rmtree(d);
}

/* A dead process's socket at base/name/rank0.sock (bound, never unlinked),
 * its directory's mtime set `age` seconds back. */
static void dead_socket_dir(const char *base, const char *name, int age)
{
	char dir[256], sock[300];
	snprintf(dir, sizeof dir, "%s/%s", base, name);
	cr_assert_eq(mkdir(dir, 0700), 0);
	snprintf(sock, sizeof sock, "%s/rank0.sock", dir);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	cr_assert_lt(strlen(sock), sizeof sa.sun_path);
	memcpy(sa.sun_path, sock, strlen(sock) + 1);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
	close(fd); /* connect now refused: a dead server's socket */
	snprintf(sock, sizeof sock, "%s/rank0.saves", dir); /* and its saves-done file */
	fd = open(sock, O_CREAT | O_WRONLY, 0600);
	cr_assert(fd >= 0);
	close(fd);
	time_t t = time(NULL) - age;
	struct utimbuf u = {t, t};
	cr_assert_eq(utime(dir, &u), 0);
}

/* vLLM's engine_id is a fresh uuid per start: a server's directory goes
 * with it, and what a killed process left (a socket nobody listens on, in
 * a directory untouched for a minute) is cleaned when a worker sets up its
 * own; a directory changed just now (an engine starting) is left alone. */
Test(lookup_socket, runtime_dirs_do_not_leak)
{
	struct prig g;
	prig_up(&g, &SPEC, cfg16(), 11);
	char d[64], base[128], p[256];
	tmpdir(d, sizeof d);
	char *saved = getenv("XDG_RUNTIME_DIR") ? strdup(getenv("XDG_RUNTIME_DIR")) : NULL;
	setenv("XDG_RUNTIME_DIR", d, 1);
	snprintf(base, sizeof base, "%s/kvrt", d);
	cr_assert_eq(kvrt_lsock_path(p, sizeof p, "engine-a", 0, true), 0);
	struct kvrt_lsock_server *srv;
	cr_assert_eq(kvrt_lsock_server_start(&srv, g.e, p), 0);
	kvrt_lsock_server_stop(srv);
	char dir[300];
	snprintf(dir, sizeof dir, "%s/engine-a", base);
	cr_assert_neq(access(dir, F_OK), 0, "the instance directory outlived its server");

	dead_socket_dir(base, "killed", 120);
	dead_socket_dir(base, "starting", 0);
	cr_assert_eq(kvrt_lsock_path(p, sizeof p, "engine-b", 0, true), 0);
	snprintf(dir, sizeof dir, "%s/killed", base);
	cr_assert_neq(access(dir, F_OK), 0, "a killed process's directory was kept");
	snprintf(dir, sizeof dir, "%s/starting/rank0.sock", base);
	cr_assert_neq(access(dir, F_OK), 0, "its dead socket is removed");
	snprintf(dir, sizeof dir, "%s/starting", base);
	cr_assert_eq(access(dir, F_OK), 0, "a directory changed just now is kept");
	snprintf(dir, sizeof dir, "%s/starting/rank0.saves", base);
	cr_assert_eq(access(dir, F_OK), 0, "a starting worker's saves-done file is kept");
	snprintf(dir, sizeof dir, "%s/engine-b", base);
	cr_assert_eq(access(dir, F_OK), 0);
	if (saved)
		setenv("XDG_RUNTIME_DIR", saved, 1);
	else
		unsetenv("XDG_RUNTIME_DIR");
	free(saved);
	prig_down(&g);
	rmtree(d);
}

/* A process of another user is refused even where the file modes would let
 * it in (the directory and socket opened up here on purpose): the server
 * closes the connection before reading a byte, counts it and says so once.
 * Needs root to become another user (skipped otherwise). */
Test(lookup_socket, another_user_is_refused)
{
	if (geteuid() != 0)
		cr_skip_test("needs root to run a process as another user");
	struct prig g;
	prig_up(&g, &SPEC, cfg16(), 11);
	char d[64], path[128];
	tmpdir(d, sizeof d);
	snprintf(path, sizeof path, "%s/rank0.sock", d);
	struct kvrt_lsock_server *srv;
	cr_assert_eq(kvrt_lsock_server_start(&srv, g.e, path), 0);
	cr_assert_eq(chmod(d, 0755), 0);
	cr_assert_eq(chmod(path, 0666), 0);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) { /* nobody: connect, ask, expect the connection closed */
		if (setgid(65534) || setuid(65534))
			_exit(3);
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		if (strlen(path) >= sizeof sa.sun_path)
			_exit(5);
		memcpy(sa.sun_path, path, strlen(path) + 1);
		int fd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa))
			_exit(4);
		uint8_t buf[256];
		uint32_t tok[4] = {1, 2, 3, 4};
		size_t n = kvrt_lsock_encode_lookup(buf, sizeof buf, 1, 2, 3, tok, 4);
		ssize_t w = send(fd, buf, n, MSG_NOSIGNAL); /* it may be closed already */
		(void)w;
		ssize_t r = read(fd, buf, sizeof buf);
		_exit(r > 0 ? 1 : 0); /* an answer: it was served */
	}
	int status = 0;
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status), "the other user's client died (status %#x)", status);
	cr_assert_eq(WEXITSTATUS(status), 0, "another user was answered (%d)", WEXITSTATUS(status));
	cr_assert_eq(wait_stat(srv, offsetof(struct kvrt_lsock_server_stats, foreign), 1), 1u);
	struct kvrt_lsock_server_stats st;
	kvrt_lsock_server_stats(srv, &st);
	cr_assert_eq(st.lookups, 0u);
	/* This user is still served. */
	const char *paths[] = {path};
	struct kvrt_lsock_client *c;
	cr_assert_eq(kvrt_lsock_client_create(&c, paths, 1, 2000), 0);
	struct kvrt_lookup_result res;
	uint32_t tok[20] = {0};
	cr_assert_eq(kvrt_lsock_client_lookup(c, 7, g.ns, tok, 20, &res), 0);
	kvrt_lsock_client_destroy(c);
	kvrt_lsock_server_stop(srv);
	prig_down(&g);
	rmtree(d);
}
