/* perf/suite_soak.c: `kvrt-perf soak`: a million request cycles through
 * connector/kvrt.h (the C API the vLLM shim calls), with every path a
 * server takes: hits, misses, aborts while waiting, preemptions, evictions,
 * disk demotions and promotions, Redis (a redis-server the suite starts on
 * a free loopback port, stopped by its PID; skipped with a note when
 * redis-server is missing), and checks that nothing leaks and nothing
 * wrong is ever loaded.
 *
 * The model: 2 layers, 1 KV head x 32, fp16, FlashAttention's 5-D layout,
 * block 16, chunk 32 tokens (8 KiB chunks), so the API's own work
 * dominates. 256 documents of 512 random tokens; a request is the first
 * 16..512 tokens of one (skewed towards the first documents), so prompts
 * share prefixes of every length. The CPU pool holds ~2000 chunks, the
 * disk tier ~3000, of ~4000 distinct ones: chunks move all the time.
 *
 * A step, in the shim's order: waiting requests are looked up (Redis may
 * answer -EINPROGRESS: asked again next step); 3% abort while waiting
 * (request_finished without blocks); the others get blocks (the [0, hit)
 * ones poisoned first) and after_alloc; 2% of steps preempt a running
 * request (its blocks freed at once, listed in the metadata, looked up
 * again later). The forward writes every new token's KV (a function of
 * layer, position and token id) between wait_layer and save_layer. After
 * the step every loaded token is checked against that function, except in
 * blocks reported as load errors (vLLM recomputes those). A request
 * decodes 0-2 more steps, then finishes (delay_free honoured: blocks come
 * back through get_finished).
 *
 * Figures: request cycles/s; RSS growth from the end of warm-up (10% of
 * the cycles) to the end, and over the second half alone, in %; file
 * descriptors then and at the end;
 * after a drain and up to 5 s idle: pins, pool slabs not accounted for by
 * CPU-tier chunks, wrong tokens loaded (must all be 0); the tier
 * movements seen.
 * Options: cycles=N (default 1,000,000; --quick 20,000), redis=0.
 */
#include <dirent.h>
#include <fcntl.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include "connector/kvrt.h"
#include "perf/perf.h"

#define S_BLOCK 16
#define S_CHUNK 32
#define S_LAYERS 2
#define S_HEAD 32 /* one KV head of 32 fp16 */
#define S_TOKB (2 * S_HEAD * 2) /* K + V of a token of a layer, bytes */
#define S_DOCS 256
#define S_MAXLEN 512
#define S_MAXBLK (S_MAXLEN / S_BLOCK + 1)
#define S_NBLOCKS 2048
#define S_SLOTS 64 /* requests in the system at once */
#define S_BATCH 16 /* admitted per step at most */

enum { R_FREE, R_WAITING, R_RUNNING, R_DELAYED };

struct sreq {
	char id[32];
	uint32_t idn, gen, doc, len, hit, left;
	int32_t blk[S_MAXBLK];
	uint32_t nblk;
	int state;
	bool admitted; /* in this step's batch */
};

struct soak {
	struct kvrt_perf *p;
	struct kvrt_worker *w;
	struct kvrt_sched *s;
	uint16_t *mem[S_LAYERS];
	struct kvrt_tensor t[S_LAYERS];
	uint32_t *docs; /* S_DOCS x S_MAXLEN token ids */
	int32_t freel[S_NBLOCKS];
	uint32_t nfree;
	struct sreq r[S_SLOTS];
	uint64_t rng;
	uint64_t done, aborted, preempted, inprogress, wrong, checked, errblocks, steps;
	unsigned char finbuf[1 << 14];
};

static uint64_t _rnd(struct soak *x)
{
	x->rng ^= x->rng << 13;
	x->rng ^= x->rng >> 7;
	x->rng ^= x->rng << 17;
	return x->rng;
}

/* The KV the "model" writes for token tok at position pos of layer l. */
static inline uint16_t _kv(uint32_t l, uint32_t pos, uint32_t tok, uint32_t kv, uint32_t e)
{
	return (uint16_t)((tok * 2654435761u) ^ (pos * 40503u) ^ (l * 97u + kv * 12345u + e));
}

/* Element (kv, block, offset, e) of layer l: shape {2, blocks, 16, 1, 32}. */
static inline uint16_t *_at(struct soak *x, uint32_t l, uint32_t kv, int32_t b, uint32_t off)
{
	return x->mem[l] + ((size_t)kv * S_NBLOCKS + (size_t)b) * S_BLOCK * S_HEAD + (size_t)off * S_HEAD;
}

static void _write(struct soak *x, uint32_t l, const struct sreq *q, uint32_t from, uint32_t to)
{
	const uint32_t *tok = x->docs + (size_t)q->doc * S_MAXLEN;
	for (uint32_t i = from; i < to; i++)
		for (uint32_t kv = 0; kv < 2; kv++) {
			uint16_t *d = _at(x, l, kv, q->blk[i / S_BLOCK], i % S_BLOCK);
			for (uint32_t e = 0; e < S_HEAD; e++)
				d[e] = _kv(l, i, tok[i], kv, e);
		}
}

/* Loaded tokens [0, q->hit) hold the model's KV, blocks in err[] aside. */
static void _check(struct soak *x, const struct sreq *q, const int64_t *err, size_t nerr)
{
	const uint32_t *tok = x->docs + (size_t)q->doc * S_MAXLEN;
	for (uint32_t i = 0; i < q->hit; i++) {
		int32_t b = q->blk[i / S_BLOCK];
		bool bad = false;
		for (size_t k = 0; k < nerr && !bad; k++)
			bad = err[k] == b;
		if (bad) {
			i = (i / S_BLOCK + 1) * S_BLOCK - 1;
			continue;
		}
		x->checked++;
		for (uint32_t l = 0; l < S_LAYERS; l++)
			for (uint32_t kv = 0; kv < 2; kv++) {
				const uint16_t *d = _at(x, l, kv, b, i % S_BLOCK);
				for (uint32_t e = 0; e < S_HEAD; e++)
					if (d[e] != _kv(l, i, tok[i], kv, e)) {
						x->wrong++;
						return;
					}
			}
	}
}

static struct kvrt_request _creq(struct soak *x, const struct sreq *q)
{
	return (struct kvrt_request){.id = q->id, .id_len = q->idn,
				     .tokens = x->docs + (size_t)q->doc * S_MAXLEN, .num_tokens = q->len,
				     .total_tokens = q->len, .prompt_tokens = q->len};
}

static void _free_blocks(struct soak *x, struct sreq *q)
{
	for (uint32_t i = 0; i < q->nblk; i++)
		x->freel[x->nfree++] = q->blk[i];
	q->nblk = 0;
}

static void _new_req(struct soak *x, uint32_t slot)
{
	struct sreq *q = &x->r[slot];
	q->gen++;
	q->idn = (uint32_t)snprintf(q->id, sizeof q->id, "soak-%u-%u", slot, q->gen);
	q->doc = (uint32_t)(_rnd(x) % (_rnd(x) % S_DOCS + 1));
	q->len = 16 + (uint32_t)(_rnd(x) % (S_MAXLEN - 15));
	q->state = R_WAITING;
	q->hit = 0;
	q->nblk = 0;
}

static void _finish(struct soak *x, struct sreq *q)
{
	bool delay = false;
	kvrt_sched_finished(x->s, q->id, q->idn, &delay);
	if (delay) {
		q->state = R_DELAYED;
	} else {
		_free_blocks(x, q);
		q->state = R_FREE;
	}
	x->done++;
}

/* get_finished: delay_free requests reported sent give their blocks back. */
static void _reap(struct soak *x)
{
	uint32_t ns = 0, nr = 0, nf = 0;
	kvrt_worker_get_finished(x->w, x->finbuf, sizeof x->finbuf, &ns, &nr, &nf);
	const unsigned char *b = x->finbuf;
	for (uint32_t i = 0; i < ns; i++) {
		uint32_t n = (uint32_t)b[0] | (uint32_t)b[1] << 8;
		unsigned slot, gen;
		char id[40];
		memcpy(id, b + 2, n < sizeof id - 1 ? n : sizeof id - 1);
		id[n < sizeof id - 1 ? n : sizeof id - 1] = 0;
		if (sscanf(id, "soak-%u-%u", &slot, &gen) == 2 && slot < S_SLOTS && x->r[slot].gen == gen &&
		    x->r[slot].state == R_DELAYED) {
			_free_blocks(x, &x->r[slot]);
			x->r[slot].state = R_FREE;
		}
		b += 2 + n;
	}
}

static int _step(struct soak *x, bool drain)
{
	struct kvrt_sched_req sr[S_BATCH];
	struct kvrt_request rq[S_BATCH];
	struct sreq *adm[S_BATCH];
	uint32_t nadm = 0;
	struct kvrt_bytes pre = {0};
	uint32_t npre = 0;
	x->steps++;
	/* a preemption: a running request's blocks go back at once */
	if (!drain && _rnd(x) % 100 < 2) {
		uint32_t slot = (uint32_t)(_rnd(x) % S_SLOTS);
		struct sreq *q = &x->r[slot];
		if (q->state == R_RUNNING) {
			pre = (struct kvrt_bytes){q->id, q->idn};
			npre = 1;
			_free_blocks(x, q);
			q->state = R_WAITING;
			x->preempted++;
		}
	}
	for (uint32_t i = 0; i < S_SLOTS && nadm < S_BATCH && !drain; i++) {
		struct sreq *q = &x->r[i];
		if (q->state == R_FREE)
			_new_req(x, i);
		if (q->state != R_WAITING || (npre && pre.data == q->id))
			continue;
		struct kvrt_request c = _creq(x, q);
		uint32_t m = 0;
		bool as = false;
		int rc = kvrt_sched_lookup(x->s, &c, 0, &m, &as);
		if (rc == -EINPROGRESS) {
			x->inprogress++;
			continue;
		}
		if (_rnd(x) % 100 < 3) { /* aborted while waiting */
			_finish(x, q);
			x->aborted++;
			continue;
		}
		uint32_t nb = (q->len + 2 + S_BLOCK - 1) / S_BLOCK;
		if (x->nfree < nb)
			continue; /* waits for blocks; its pins are replaced by the next lookup */
		for (uint32_t b = 0; b < nb; b++)
			q->blk[b] = x->freel[--x->nfree];
		q->nblk = nb;
		q->hit = m;
		for (uint32_t l = 0; l < S_LAYERS && m; l++) /* poison what must be loaded */
			for (uint32_t kv = 0; kv < 2; kv++)
				for (uint32_t b = 0; b < (m + S_BLOCK - 1) / S_BLOCK; b++)
					memset(_at(x, l, kv, q->blk[b], 0), 0xa5, (size_t)S_BLOCK * S_HEAD * 2);
		rq[nadm] = c;
		kvrt_sched_after_alloc(x->s, &c, q->blk, nb, 0, m);
		uint32_t need = kvrt_sched_save_need(x->s, q->id, q->idn, q->len, q->len);
		sr[nadm] = (struct kvrt_sched_req){.req = rq[nadm], .num_computed = q->len,
						   .block_ids = need ? q->blk : NULL, .num_blocks = need ? nb : 0};
		q->admitted = true;
		adm[nadm++] = q;
	}
	struct kvrt_sched_step st = {.reqs = sr, .num_reqs = nadm, .preempted = npre ? &pre : NULL,
				     .num_preempted = npre};
	const void *meta = NULL;
	size_t mlen = 0;
	int rc = kvrt_sched_build_meta(x->s, &st, &meta, &mlen);
	if (rc && !meta)
		return rc;
	/* the worker's step */
	if (npre)
		kvrt_worker_preempted(x->w);
	if (mlen && (rc = kvrt_worker_bind(x->w, meta, mlen)))
		return rc;
	kvrt_worker_start_load(x->w);
	for (uint32_t l = 0; l < S_LAYERS; l++) {
		kvrt_worker_wait_layer(x->w, l);
		for (uint32_t i = 0; i < nadm; i++)
			_write(x, l, adm[i], adm[i]->hit, adm[i]->len);
		kvrt_worker_save_layer(x->w, l);
	}
	kvrt_worker_wait_save(x->w);
	_reap(x);
	int64_t err[256];
	size_t nerr = kvrt_worker_load_errors(x->w, err, 256);
	x->errblocks += nerr;
	for (uint32_t i = 0; i < nadm; i++) {
		_check(x, adm[i], err, nerr);
		adm[i]->admitted = false;
		adm[i]->state = R_RUNNING;
		adm[i]->left = (uint32_t)(_rnd(x) % 3) + 1;
	}
	/* decode: requests admitted before this step advance; done ones end */
	for (uint32_t i = 0; i < S_SLOTS; i++) {
		struct sreq *q = &x->r[i];
		if (q->state == R_RUNNING && (drain || --q->left == 0))
			_finish(x, q);
		else if (drain && q->state == R_WAITING) {
			_finish(x, q); /* aborted by the drain */
			x->done--;
		}
	}
	return 0;
}

static long _rss_kib(void)
{
	FILE *f = fopen("/proc/self/statm", "r");
	long pages = 0, res = 0;
	if (!f)
		return -1;
	if (fscanf(f, "%ld %ld", &pages, &res) != 2)
		res = -1;
	fclose(f);
	return res < 0 ? -1 : res * (sysconf(_SC_PAGESIZE) / 1024);
}

static int _nfds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;
	if (!d)
		return -1;
	while (readdir(d))
		n++;
	closedir(d);
	return n - 3; /* ., .., the DIR's own */
}

/* A redis-server on a free loopback port, or 0 (missing, did not start). */
static int _redis_up(pid_t *pid, char *dir)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof a;
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || getsockname(s, (struct sockaddr *)&a, &al)) {
		if (s >= 0)
			close(s);
		return 0;
	}
	int port = ntohs(a.sin_port);
	close(s);
	if (!mkdtemp(dir))
		return 0;
	char ports[16];
	snprintf(ports, sizeof ports, "%d", port);
	*pid = fork();
	if (*pid == 0) {
		int nul = open("/dev/null", O_WRONLY);
		if (nul >= 0) {
			dup2(nul, 1);
			dup2(nul, 2);
		}
		execlp("redis-server", "redis-server", "--port", ports, "--bind", "127.0.0.1", "--save", "",
		       "--appendonly", "no", "--dir", dir, (char *)NULL);
		_exit(127);
	}
	if (*pid < 0)
		return 0;
	for (int i = 0; i < 300; i++) {
		int c = socket(AF_INET, SOCK_STREAM, 0);
		a.sin_port = htons((uint16_t)port);
		char buf[8] = {0};
		bool ok = c >= 0 && !connect(c, (struct sockaddr *)&a, sizeof a) && write(c, "PING\r\n", 6) == 6 &&
			  read(c, buf, 5) == 5 && !memcmp(buf, "+PONG", 5);
		if (c >= 0)
			close(c);
		if (ok)
			return port;
		int st;
		if (waitpid(*pid, &st, WNOHANG) == *pid)
			break;
		usleep(10000);
	}
	kill(*pid, SIGKILL);
	waitpid(*pid, NULL, 0);
	*pid = 0;
	return 0;
}

static void _rm_tree(const char *dir)
{
	char cmd[512];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "soak: could not remove %s\n", dir);
}

static void _fig(struct kvrt_perf *p, const char *name, double v, const char *unit)
{
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){.name = name, .value = v, .unit = unit});
}

static int _handles_up(struct soak *x, const char *disk, int port)
{
	char inst[64], url[64], err[512];
	snprintf(inst, sizeof inst, "soak-%d", (int)getpid());
	snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
	/* pool ~16 MiB (~2000 chunks), disk ~24 MiB (~3000) */
	const char *keys[] = {"max_local_cpu_size", "device", "chunk_size", "local_disk", "max_local_disk_size",
			      "remote_url"};
	const char *vals[] = {"0.016", "host", "32", disk, "0.024", url};
	struct kvrt_options o = {.instance = inst, .model_id = "kvrt/soak", .dtype = "float16", .tp_size = 1,
				 .pp_size = 1, .block_size = S_BLOCK, .keys = keys, .values = vals,
				 .num_keys = port ? 6 : 5};
	int rc = kvrt_worker_create(&x->w, &o, err, sizeof err);
	if (rc) {
		kvrt_perf_note(x->p, "soak: worker_create: %s (%d)", err, rc);
		return rc;
	}
	if ((rc = kvrt_worker_register(x->w, x->t, S_LAYERS)))
		return rc;
	if ((rc = kvrt_sched_create(&x->s, &o, err, sizeof err)))
		kvrt_perf_note(x->p, "soak: sched_create: %s (%d)", err, rc);
	return rc;
}

static int run(struct kvrt_perf *p)
{
	struct soak *x = calloc(1, sizeof *x);
	if (!x)
		return -ENOMEM;
	x->p = p;
	x->rng = 0x9e3779b97f4a7c15ull;
	uint64_t cycles = strtoull(kvrt_perf_opt(p, "cycles", kvrt_perf_quick(p) ? "20000" : "1000000"), NULL, 10);
	bool want_redis = strcmp(kvrt_perf_opt(p, "redis", "1"), "0") != 0;
	char disk[] = "/tmp/kvrt-soak-disk.XXXXXX", rdir[] = "/tmp/kvrt-soak-redis.XXXXXX";
	pid_t rpid = 0;
	int port = 0, rc = 0;
	bool have_disk = mkdtemp(disk) != NULL;
	if (want_redis && !(port = _redis_up(&rpid, rdir)))
		kvrt_perf_note(p, "soak: redis-server missing or did not start: Redis off");
	x->docs = malloc(sizeof(uint32_t) * S_DOCS * S_MAXLEN);
	for (uint32_t l = 0; l < S_LAYERS; l++)
		x->mem[l] = calloc((size_t)2 * S_NBLOCKS * S_BLOCK * S_HEAD, sizeof(uint16_t));
	if (!have_disk || !x->docs || !x->mem[0] || !x->mem[1]) {
		rc = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < (size_t)S_DOCS * S_MAXLEN; i++)
		x->docs[i] = 10 + (uint32_t)(_rnd(x) % 30000);
	for (uint32_t l = 0; l < S_LAYERS; l++) {
		struct kvrt_tensor *t = &x->t[l];
		t->data = x->mem[l];
		t->elem_size = 2;
		t->name = "soak";
		t->layout = KVRT_LAYOUT_FLASH_ATTN;
		t->ndim = 5;
		int64_t sh[5] = {2, S_NBLOCKS, S_BLOCK, 1, S_HEAD};
		int64_t st[5] = {(int64_t)S_NBLOCKS * S_BLOCK * S_HEAD, S_BLOCK * S_HEAD, S_HEAD, S_HEAD, 1};
		memcpy(t->shape, sh, sizeof sh);
		memcpy(t->stride, st, sizeof st);
	}
	for (uint32_t i = 1; i < S_NBLOCKS; i++) /* block 0: vLLM's null block */
		x->freel[x->nfree++] = (int32_t)i;
	if ((rc = _handles_up(x, disk, port)))
		goto out;
	long rss0 = 0, rss_mid = 0;
	int fds0 = 0;
	uint64_t warm = cycles / 10;
	double t0 = 0;
	while (x->done < cycles) {
		if ((rc = _step(x, false)))
			goto out;
		if (!rss0 && x->done >= warm) {
			kvrt_worker_flush(x->w);
			rss0 = _rss_kib();
			fds0 = _nfds();
			t0 = (double)kvrt_now_ns() / 1e9;
		}
		if (!rss_mid && x->done >= warm + (cycles - warm) / 2)
			rss_mid = _rss_kib(); /* a leak grows in both halves, a fill-up in the first */
		if (x->steps % 256 == 0)
			kvrt_perf_progress(p, "soak", x->done, cycles);
	}
	kvrt_perf_progress(p, "soak", cycles, cycles);
	double secs = (double)kvrt_now_ns() / 1e9 - t0;
	/* drain: every request ends, every delayed free comes back */
	if ((rc = _step(x, true)))
		goto out;
	kvrt_worker_flush(x->w);
	for (int i = 0; i < 1000; i++) {
		bool any = false;
		for (uint32_t k = 0; k < S_SLOTS; k++)
			any |= x->r[k].state == R_DELAYED;
		if (!any)
			break;
		if ((rc = _step(x, true)))
			goto out;
		usleep(2000);
	}
	/* idle: demotions, promotions and Redis writes still in flight end
	 * within moments; a slab that stays unaccounted for is a leak */
	struct kvrt_stats s;
	uint64_t sb = (uint64_t)S_CHUNK * S_LAYERS * S_TOKB;
	double leaked = 0;
	for (int i = 0; i < 100; i++) {
		kvrt_worker_flush(x->w);
		kvrt_worker_stats(x->w, &s);
		leaked = ((double)s.pool_used_bytes - (double)s.cpu_chunks * (double)sb) / (double)sb;
		if (leaked == 0)
			break;
		usleep(50000);
	}
	long rss1 = _rss_kib();
	int fds1 = _nfds();
	uint32_t held = 0;
	for (uint32_t k = 0; k < S_SLOTS; k++)
		held += x->r[k].state == R_DELAYED;
	_fig(p, "request cycles/s (after warm-up)", (double)(x->done - warm) / (secs > 0 ? secs : 1), "1/s");
	_fig(p, "RSS growth after warm-up", rss0 > 0 ? 100.0 * (double)(rss1 - rss0) / (double)rss0 : -1, "%");
	_fig(p, "RSS growth, second half", rss_mid > 0 ? 100.0 * (double)(rss1 - rss_mid) / (double)rss_mid : -1, "%");
	_fig(p, "RSS after warm-up", (double)rss0 / 1024.0, "MiB");
	_fig(p, "file descriptors after warm-up", fds0, "fds");
	_fig(p, "file descriptors at the end", fds1, "fds");
	_fig(p, "pins after the drain", (double)s.pinned, "pins");
	_fig(p, "pool slabs not held by CPU-tier chunks", leaked, "slabs");
	_fig(p, "requests still holding blocks", held, "reqs");
	_fig(p, "wrong tokens loaded", (double)x->wrong, "tokens");
	_fig(p, "loaded tokens checked", (double)x->checked, "tokens");
	_fig(p, "request cycles", (double)x->done, "reqs");
	_fig(p, "aborted while waiting", (double)x->aborted, "reqs");
	_fig(p, "preempted", (double)x->preempted, "reqs");
	_fig(p, "load error blocks (recomputed)", (double)x->errblocks, "blocks");
	_fig(p, "evicted from the CPU tier", (double)s.evicted, "chunks");
	_fig(p, "demoted to disk", (double)s.demoted, "chunks");
	_fig(p, "promoted from disk", (double)s.promoted, "chunks");
	_fig(p, "Redis writes", (double)s.remote_writes, "chunks");
	_fig(p, "Redis hits", (double)s.remote_hits, "chunks");
	_fig(p, "lookups answered later (Redis asked)", (double)x->inprogress, "lookups");
	kvrt_perf_note(p, "soak: %llu cycles, %llu steps; Redis %s; pool %llu KiB, %llu chunks in all tiers",
		       (unsigned long long)x->done, (unsigned long long)x->steps, port ? "on" : "off",
		       (unsigned long long)(s.pool_bytes >> 10), (unsigned long long)s.chunks);
out:
	if (x->s)
		kvrt_sched_destroy(x->s);
	if (x->w)
		kvrt_worker_destroy(x->w);
	if (rpid > 0) {
		kill(rpid, SIGTERM);
		waitpid(rpid, NULL, 0);
		_rm_tree(rdir);
	}
	if (have_disk)
		_rm_tree(disk);
	for (uint32_t l = 0; l < S_LAYERS; l++)
		free(x->mem[l]);
	free(x->docs);
	free(x);
	return rc;
}

const struct kvrt_perf_suite kvrt_perf_suite_soak = {
	.name = "soak",
	.what = "1M request cycles through the C API (hits, aborts, preemptions, tiers, Redis): leaks and wrong loads",
	.run = run,
};
