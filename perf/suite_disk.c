/* perf/suite_disk.c: the local disk tier's write and read throughput, next
 * to dd with the same flags on the same directory, in the same run.
 *
 * For each chunk size (8 and 32 MiB) and each mode (buffered, O_DIRECT):
 *   kvrt write  N chunks through kvrt_disk_write (checksum, temp file,
 *               rename), timed from the first submit to the last WRITTEN
 *   dd write    dd if=/dev/zero of=DIR/dd.bin bs=SIZE count=N [oflag=direct]
 *   kvrt read   N chunks through kvrt_disk_read (open, header, checksum
 *               verified), 4 buffers in flight
 *   dd read     dd if=DIR/dd.bin of=/dev/null bs=SIZE [iflag=direct]
 * Each figure is the best of two rounds (kvrt and dd interleaved).
 * Neither side fsyncs (kvrt's default; see actors/disk.h "Durability"), so a
 * buffered write is a page-cache ingest for both. Before every read the
 * run's own files are evicted from the page cache (fdatasync +
 * POSIX_FADV_DONTNEED per file: nothing else on the machine is touched, no
 * root needed); if that fails a note says buffered reads are page-cache
 * reads for kvrt and dd alike. Options: --opt disk_dir=PATH (default /tmp),
 * --opt disk_mib=TOTAL per figure (default 128, 64 with --quick),
 * --opt disk_cold=0 (keep the page cache: warm reads).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "actors/disk.h"
#include "perf/perf.h"
#include "runtime/actor.h"

extern char **environ;

#define _BASE 10u     /* msg_base of disk completions */
#define _INFLIGHT 4u  /* read buffers in flight */

/* The notify actor: counts completions; the bench thread polls them. */
struct _sink {
	_Atomic uint64_t written; /* WRITTEN completions */
	_Atomic uint64_t read;    /* READ_DONE completions */
	_Atomic uint64_t errors;  /* completions with a nonzero status */
};

static void _sink_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct _sink *s = kvrt_actor_data(a);
	if (m->arg.i64[2] != 0 && m->type != _BASE + KVRT_DISK_DROPPED)
		atomic_fetch_add(&s->errors, 1);
	if (m->type == _BASE + KVRT_DISK_WRITTEN)
		atomic_fetch_add_explicit(&s->written, 1, memory_order_release);
	else if (m->type == _BASE + KVRT_DISK_READ_DONE)
		atomic_fetch_add_explicit(&s->read, 1, memory_order_release);
}

static const struct kvrt_actor_ops _sink_ops = {.handle = _sink_handle};

/* Wait until *ctr >= n (completions are ms apart: a short sleep is fine). */
static int _wait_for(_Atomic uint64_t *ctr, uint64_t n)
{
	uint64_t deadline = kvrt_now_ns() + 120000000000ull;
	while (atomic_load_explicit(ctr, memory_order_acquire) < n) {
		if (kvrt_now_ns() > deadline)
			return -ETIMEDOUT;
		usleep(20);
	}
	return 0;
}

static int _rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(p);
}

/* Run dd with args; returns seconds, or a negative value on failure. */
static double _dd(char *const argv[])
{
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	pid_t pid;
	uint64_t t0 = kvrt_now_ns();
	int rc = posix_spawnp(&pid, "dd", &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	if (rc != 0)
		return -1;
	int st;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			return -1;
	uint64_t t1 = kvrt_now_ns();
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		return -1;
	return (double)(t1 - t0) / 1e9;
}

/* Evict this run's own files from the page cache (fdatasync, then
 * POSIX_FADV_DONTNEED on each file under the suite's directory), so reads
 * are cold for kvrt and dd alike. Touches nothing else on the machine
 * (dropping the whole page cache would hurt whatever else runs there) and
 * needs no root. false when a file could not be evicted. */
static bool _evict_ok;

static int _evict_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)ftw;
	if (flag != FTW_F)
		return 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	if (fdatasync(fd) != 0 || posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0)
		_evict_ok = false;
	close(fd);
	return 0;
}

static bool _drop_caches(const char *dir)
{
	_evict_ok = true;
	if (nftw(dir, _evict_one, 16, FTW_PHYS) != 0)
		return false;
	return _evict_ok;
}

struct _cfg {
	const char *dir;   /* this configuration's directory */
	uint64_t chunk;    /* payload bytes per chunk */
	uint64_t n;        /* chunks */
	bool odirect;
};

struct _result {
	double kw, kr, dw, dr; /* GB/s; dd < 0: failed */
	bool odirect_used;
};

/* A chunk header of `bytes` payload: 1 layer of bytes/4096 tokens. */
static struct kvrt_chunk_header _hdr(uint64_t i, uint64_t bytes, uint64_t salt)
{
	return (struct kvrt_chunk_header){
		.format_version = KVRT_CHUNK_FORMAT_VERSION,
		.header_size = KVRT_CHUNK_HEADER_SIZE,
		.namespace_hash = 0x70657266,
		/* hi's top byte 0: every file in subdirectory 00, made once
		 * by the warm-up, as in a tier that has been running. */
		.key = {.lo = (i + 1) * 0x9e3779b97f4a7c15ull ^ salt, .hi = i + 1},
		.shape = {.num_layers = 1, .token_bytes = 4096, .elem_size = 2},
		.num_tokens = (uint32_t)(bytes / 4096),
		.payload_len = bytes,
	};
}

static int _run_cfg(struct kvrt_perf *p, const struct _cfg *c, uint8_t *src, uint8_t *bufs,
		    bool can_drop, struct _result *r)
{
	struct _sink sink = {0};
	struct kvrt_actor *na;
	int rc = kvrt_actor_create(&na, &(struct kvrt_actor_config){
						.name = "perf-sink", .mailbox_size = 1024,
						.ops = &_sink_ops, .data = &sink});
	if (rc)
		return rc;
	struct kvrt_disk *d;
	rc = kvrt_disk_open(&d, &(struct kvrt_disk_config){.dir = c->dir,
							   .budget_bytes = UINT64_MAX / 2,
							   .namespace_hash = 0x70657266,
							   .notify = na,
							   .msg_base = _BASE,
							   .use_odirect = c->odirect,
							   .max_pending_writes = 1024});
	if (rc) {
		kvrt_actor_destroy(na);
		return rc;
	}
	struct kvrt_disk_stats st;
	kvrt_disk_stats(d, &st);
	r->odirect_used = st.odirect;
	uint64_t salt = kvrt_now_ns();

	/* Warm-up: one small chunk (makes subdirectory 00). */
	struct kvrt_chunk_header wh = _hdr(UINT32_MAX, 4096, salt);
	if ((rc = kvrt_disk_write(d, &wh, src, 0)) || (rc = _wait_for(&sink.written, 1)))
		goto out;
	sync();

	/* kvrt write. */
	uint64_t t0 = kvrt_now_ns();
	for (uint64_t i = 0; i < c->n; i++) {
		struct kvrt_chunk_header h = _hdr(i, c->chunk, salt);
		while ((rc = kvrt_disk_write(d, &h, src, i)) == -EAGAIN)
			usleep(50);
		if (rc)
			goto out;
	}
	if ((rc = _wait_for(&sink.written, c->n + 1)))
		goto out;
	uint64_t t1 = kvrt_now_ns();
	r->kw = (double)(c->n * c->chunk) / (double)(t1 - t0);
	kvrt_perf_progress(p, "disk", 1, 4);

	/* dd write, same sizes and flags. */
	sync();
	char path[1100], bs[32], cnt[32], of[1200], iff[1200];
	snprintf(path, sizeof path, "%s/dd.bin", c->dir);
	snprintf(bs, sizeof bs, "bs=%llu", (unsigned long long)c->chunk);
	snprintf(cnt, sizeof cnt, "count=%llu", (unsigned long long)c->n);
	snprintf(of, sizeof of, "of=%s", path);
	snprintf(iff, sizeof iff, "if=%s", path);
	char *wargv[] = {"dd", "if=/dev/zero", of, bs, cnt, "status=none",
			 r->odirect_used ? "oflag=direct" : NULL, NULL};
	double s = _dd(wargv);
	r->dw = s > 0 ? (double)(c->n * c->chunk) / s / 1e9 : -1;
	kvrt_perf_progress(p, "disk", 2, 4);

	/* kvrt read, cold cache when permitted. */
	if (can_drop)
		_drop_caches(c->dir);
	uint64_t done0 = atomic_load(&sink.read);
	t0 = kvrt_now_ns();
	for (uint64_t i = 0; i < c->n; i++) {
		if (i >= _INFLIGHT && (rc = _wait_for(&sink.read, done0 + i - _INFLIGHT + 1)))
			goto out;
		struct kvrt_chunk_header h = _hdr(i, c->chunk, salt);
		uint8_t *dst = bufs + (i % _INFLIGHT) * c->chunk;
		while ((rc = kvrt_disk_read(d, h.key, dst, c->chunk, i)) == -EAGAIN)
			usleep(50);
		if (rc)
			goto out;
	}
	if ((rc = _wait_for(&sink.read, done0 + c->n)))
		goto out;
	t1 = kvrt_now_ns();
	r->kr = (double)(c->n * c->chunk) / (double)(t1 - t0);
	kvrt_perf_progress(p, "disk", 3, 4);

	if (can_drop)
		_drop_caches(c->dir);
	char *rargv[] = {"dd", iff, "of=/dev/null", bs, "status=none",
			 r->odirect_used ? "iflag=direct" : NULL, NULL};
	s = r->dw > 0 ? _dd(rargv) : -1;
	r->dr = s > 0 ? (double)(c->n * c->chunk) / s / 1e9 : -1;
	kvrt_perf_progress(p, "disk", 4, 4);
	if (atomic_load(&sink.errors))
		rc = -EIO;
out:
	kvrt_disk_close(d);
	kvrt_actor_destroy(na);
	return rc;
}

/* GB/s of f over the 8 MiB buffers a, b (best of 3 passes of 8). */
static double _floor_gbs(int which, uint8_t *a, uint8_t *b, uint64_t n)
{
	double best = 0;
	for (int pass = 0; pass < 3; pass++) {
		uint64_t t0 = kvrt_now_ns();
		for (int i = 0; i < 8; i++) {
			if (which == 0)
				memcpy(b, a, n);
			else
				b[i] ^= (uint8_t)kvrt_chunk_checksum(a, a + 4096, n - 4096);
		}
		double g = 8.0 * (double)n / (double)(kvrt_now_ns() - t0);
		best = g > best ? g : best;
	}
	return best;
}

static void _fig(struct kvrt_perf *p, const char *what, uint64_t chunk, bool od, double v,
		 double lim, const char *ddflags)
{
	char name[96], lname[96];
	snprintf(name, sizeof name, "%s, %llu MiB chunks%s", what,
		 (unsigned long long)(chunk >> 20), od ? ", O_DIRECT" : "");
	snprintf(lname, sizeof lname, "dd bs=%lluM%s", (unsigned long long)(chunk >> 20), ddflags);
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){
				 .name = name,
				 .value = v,
				 .unit = "GB/s",
				 .limit_name = lim > 0 ? lname : NULL,
				 .limit = lim > 0 ? lim : 0,
				 .target = lim > 0 ? 0.8 : 0,
				 .better = KVRT_PERF_HIGHER,
			 });
}

static int _run(struct kvrt_perf *p)
{
	const char *base = kvrt_perf_opt(p, "disk_dir", "/tmp");
	uint64_t total_mib = strtoull(kvrt_perf_opt(p, "disk_mib", kvrt_perf_quick(p) ? "64" : "128"),
				      NULL, 10);
	if (total_mib < 32)
		total_mib = 32;
	char top[512];
	snprintf(top, sizeof top, "%s/kvrt-perf-disk-XXXXXX", base);
	if (!mkdtemp(top)) {
		kvrt_perf_note(p, "disk: cannot create a directory under %s: %s", base,
			       strerror(errno));
		return -errno;
	}
	const uint64_t sizes[] = {8ull << 20, 32ull << 20};
	uint64_t maxchunk = sizes[KVRT_ARRAY_LEN(sizes) - 1];
	uint8_t *src = aligned_alloc(4096, maxchunk);
	uint8_t *bufs = aligned_alloc(4096, maxchunk * _INFLIGHT);
	int rc = 0;
	if (!src || !bufs) {
		rc = -ENOMEM;
		goto out;
	}
	uint64_t x = 0x9e3779b97f4a7c15ull;
	for (uint64_t i = 0; i < maxchunk / 8; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		memcpy(src + i * 8, &x, 8);
	}
	memset(bufs, 0x5a, maxchunk * _INFLIGHT);
	bool can_drop = strcmp(kvrt_perf_opt(p, "disk_cold", "1"), "0") != 0 && _drop_caches(top);
	bool dd_failed = false, od_refused = false;
	for (int od = 0; od < 2; od++) {
		for (size_t si = 0; si < KVRT_ARRAY_LEN(sizes); si++) {
			char dir[1000];
			snprintf(dir, sizeof dir, "%s/%s-%llu", top, od ? "direct" : "buffered",
				 (unsigned long long)(sizes[si] >> 20));
			struct _cfg c = {.dir = dir, .chunk = sizes[si],
					 .n = (total_mib << 20) / sizes[si], .odirect = od};
			/* Two rounds, kvrt and dd interleaved; the best of each
			 * (a shared disk is noisy). */
			struct _result r = {0};
			for (int round = 0; round < 2 && rc == 0; round++) {
				struct _result q = {0};
				rc = _run_cfg(p, &c, src, bufs, can_drop, &q);
				nftw(dir, _rm_cb, 16, FTW_DEPTH | FTW_PHYS);
				r.kw = q.kw > r.kw ? q.kw : r.kw;
				r.kr = q.kr > r.kr ? q.kr : r.kr;
				r.dw = round == 0 || q.dw > r.dw ? q.dw : r.dw;
				r.dr = round == 0 || q.dr > r.dr ? q.dr : r.dr;
				r.odirect_used = q.odirect_used;
			}
			if (rc) {
				kvrt_perf_note(p, "disk: %s, %llu MiB chunks failed: %s",
					       od ? "O_DIRECT" : "buffered",
					       (unsigned long long)(sizes[si] >> 20), strerror(-rc));
				goto out;
			}
			if (od && !r.odirect_used) {
				od_refused = true;
				break;
			}
			dd_failed |= r.dw < 0 || r.dr < 0;
			_fig(p, "write", sizes[si], od, r.kw, r.dw, od ? " oflag=direct" : "");
			_fig(p, can_drop ? "read (cold cache)" : "read", sizes[si], od, r.kr, r.dr,
			     od ? " iflag=direct" : "");
		}
	}
	/* kvrt verifies what dd does not: a read costs a copy plus a checksum
	 * of every byte on the disk actor's one thread. */
	double mc = _floor_gbs(0, src, bufs, 8u << 20), xx = _floor_gbs(1, src, bufs, 8u << 20);
	kvrt_perf_note(p, "disk: CPU floor in this run: memcpy %.2f GB/s, XXH3 %.2f GB/s: a page-cache read plus checksum tops out near %.2f GB/s on one thread",
		       mc, xx, 1.0 / (1.0 / mc + 1.0 / xx));
	kvrt_perf_note(p, "disk: %llu MiB per figure in %s; no fsync on either side (buffered writes land in the page cache for kvrt and dd alike)",
		       (unsigned long long)total_mib, base);
	if (!can_drop)
		kvrt_perf_note(p, "disk: page cache not dropped (disk_cold=0, or not permitted): buffered reads are page-cache reads for kvrt and dd alike");
	if (od_refused)
		kvrt_perf_note(p, "disk: %s refuses O_DIRECT: O_DIRECT figures skipped", base);
	if (dd_failed)
		kvrt_perf_note(p, "disk: dd failed or is missing: figures without a limit");
out:
	nftw(top, _rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	free(src);
	free(bufs);
	return rc;
}

const struct kvrt_perf_suite kvrt_perf_suite_disk = {
	.name = "disk",
	.what = "local disk tier: write and read GB/s of 8/32 MiB chunks next to dd",
	.run = _run,
};
