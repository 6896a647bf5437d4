/* actors/disk.c: the local disk tier; see disk.h for the contract and the
 * file format.
 *
 * Structure
 * - kvrt_disk_open (owner thread): directory, lock, O_DIRECT probe, scan,
 *   then the "disk" actor. Everything the scan builds (map, LRU, counters) is
 *   handed to the actor by pthread_create's happens-before.
 * - The disk actor's handler serves REMOVE at once and appends READ and
 *   WRITE jobs to two private FIFOs (a queued read's file is opened and
 *   prefetched right away, bounded). An ev_check watcher serves one read, or
 *   else one step (<= 8 MiB) of the head write, per loop iteration, and an
 *   ev_idle watcher, active while jobs wait, keeps the loop from blocking in
 *   epoll meanwhile: a mailbox drain and an I/O step alternate.
 * - Completions go to cfg->notify through an outbox (runtime/outbox.h): by
 *   try_post, or when the mailbox is full, in order, retried by a timer.
 *
 * Platform notes
 * - O_DIRECT needs buffer address, file offset and length aligned to the
 *   logical block size; 4096 covers every device we expect. tmpfs refuses
 *   O_DIRECT at open (EINVAL): probed once at kvrt_disk_open.
 * - A write that crosses RLIMIT_FSIZE raises SIGXFSZ (fatal by default) before
 *   failing with EFBIG; kvrt does not touch signal dispositions (the host
 *   process owns them).
 */
#include "actors/disk.h"

#include <dirent.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/log.h"
#include "runtime/outbox.h"

#define _STEP_BYTES (8u << 20)            /* most bytes per write step / read piece */
#define _ALIGN 4096u                      /* O_DIRECT alignment */
#define _NOTIFY_RETRY_S 0.0002            /* backlog retry period */
#define _CLOSE_NOTIFY_NS (5000000000ull) /* how long close waits for notify room */
#define _NAME_LEN 48                      /* "xx/<32 hex>.kvc" + NUL */

/* Messages to the disk actor (internal). */
enum {
	_MSG_WRITE = 1,  /* ptr[0]: struct _disk_job * (owned by the actor from here) */
	_MSG_READ = 2,   /* u64[0..1] key, ptr[2] dst, u64[3] cap, u64[4] cookie */
	_MSG_REMOVE = 3, /* u64[0..1] key */
};

/* A chunk on disk (internal): in the map and the LRU list. */
struct _disk_ent {
	struct kvrt_chunk_key key;
	uint64_t file_bytes;     /* KVRT_DISK_DATA_OFFSET + payload_len */
	uint64_t payload_len;    /* from the header */
	struct _disk_ent *hnext; /* hash chain */
	struct _disk_ent *older; /* LRU neighbour towards the oldest */
	struct _disk_ent *newer; /* LRU neighbour towards the newest */
};

/* A queued write (internal), allocated by kvrt_disk_write. */
struct _disk_job {
	struct kvrt_chunk_header h; /* what to write */
	const uint8_t *payload;     /* h.payload_len bytes, caller-owned */
	uint64_t cookie;            /* echoed in WRITTEN */
	struct _disk_job *next;     /* FIFO */
	bool cancelled;             /* a remove of this key arrived */
	bool started;               /* fd is open, reservation held */
	int fd;                     /* the .tmp file, once started */
	uint64_t done;              /* payload bytes written */
};

/* A queued read (internal), allocated by the actor when READ arrives. */
struct _disk_rjob {
	struct kvrt_chunk_key key;
	uint8_t *dst;             /* caller's buffer */
	uint64_t cap;             /* its size */
	uint64_t cookie;          /* echoed in READ_DONE */
	int fd;                   /* opened by the prefetch, or -1 */
	int open_err;             /* the prefetch's open error (-errno), or 0 */
	bool prefetched;          /* opened (and WILLNEED given) already */
	uint64_t bytes;           /* file bytes it asked the kernel for */
	struct _disk_rjob *next;  /* FIFO */
};

/* Counters written by one thread at a time (open's thread, then the actor),
 * read by any: relaxed atomics, no ordering needed for a racy snapshot. */
struct _disk_counters {
	_Atomic uint64_t files, bytes, writes, write_bytes, reads, read_bytes, found, skipped,
		dropped, removed, err_nospace, err_io, err_corrupt, err_missing, rejected,
		notify_delayed, notify_lost;
};

struct kvrt_disk {
	struct kvrt_disk_config cfg; /* copy; cfg.dir points at dir */
	char *dir;                   /* the directory path (owned) */
	int dirfd;                   /* open directory, for *at() calls */
	int lockfd;                  /* <dir>/lock, flock'd */
	bool odirect;                /* O_DIRECT in use (probed) */
	bool warned_nospace;         /* the filesystem-full warning was given (once) */
	struct kvrt_actor *actor;    /* "disk"; for callers (set after it starts) */
	struct kvrt_actor *self;     /* the same, for the actor's thread (set by _start) */

	/* Actor-owned state (the owner thread's only before the actor starts). */
	struct _disk_ent **buckets;  /* hash table by key.lo */
	uint64_t nbuckets;           /* power of two */
	uint64_t nents;              /* entries in the map */
	struct _disk_ent *oldest;    /* LRU ends */
	struct _disk_ent *newest;
	uint64_t bytes;              /* file bytes of entries in the map */
	struct _disk_job *jq_head;   /* write FIFO */
	struct _disk_job *jq_tail;
	struct _disk_rjob *rq_head;  /* read FIFO (served before writes) */
	struct _disk_rjob *rq_tail;
	uint64_t rq_ahead_bytes;     /* file bytes of prefetched, unserved reads */
	uint32_t rq_ahead;           /* how many */
	struct kvrt_outbox ob;       /* completions to cfg->notify (actor thread) */
	struct kvrt_chunk_sum *sum;  /* checksum state */
	uint8_t *hdrbuf;             /* _ALIGN bytes: a file's header block */
	uint8_t *bounce;             /* _STEP_BYTES, O_DIRECT only */
	ev_check step_w;             /* runs a write step each iteration */
	ev_idle spin_w;              /* keeps the loop polling while jobs wait */

	_Atomic uint32_t pending;    /* writes accepted, not completed */
	uint32_t max_pending;        /* cfg.max_pending_writes or default */
	struct _disk_counters c;
};

#define _INC(d, f, n) atomic_fetch_add_explicit(&(d)->c.f, (n), memory_order_relaxed)
#define _SET(d, f, v) atomic_store_explicit(&(d)->c.f, (v), memory_order_relaxed)
#define _GET(d, f) atomic_load_explicit(&(d)->c.f, memory_order_relaxed)

static uint64_t _round_up(uint64_t x, uint64_t a)
{
	return (x + a - 1) & ~(a - 1);
}

static void _key_name(struct kvrt_chunk_key k, const char *ext, char out[_NAME_LEN])
{
	snprintf(out, _NAME_LEN, "%02x/%016" PRIx64 "%016" PRIx64 "%s", (unsigned)(k.hi >> 56),
		 k.hi, k.lo, ext);
}

static int _hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* Parse "<32 lowercase hex><ext>" into *k. */
static bool _parse_name(const char *name, const char *ext, struct kvrt_chunk_key *k)
{
	size_t el = strlen(ext);
	if (strlen(name) != 32 + el || strcmp(name + 32, ext) != 0)
		return false;
	uint64_t v[2] = {0, 0};
	for (int i = 0; i < 32; i++) {
		int x = _hexval(name[i]);
		if (x < 0)
			return false;
		v[i / 16] = v[i / 16] << 4 | (uint64_t)x;
	}
	k->hi = v[0];
	k->lo = v[1];
	return true;
}

/* --- map and LRU (actor thread; owner thread during open) --------------- */

static uint64_t _bucket(const struct kvrt_disk *d, struct kvrt_chunk_key k)
{
	/* Keys are XXH3 outputs: their low bits are already uniform. */
	return k.lo & (d->nbuckets - 1);
}

static struct _disk_ent *_find(struct kvrt_disk *d, struct kvrt_chunk_key k)
{
	for (struct _disk_ent *e = d->buckets[_bucket(d, k)]; e; e = e->hnext)
		if (kvrt_chunk_key_eq(e->key, k))
			return e;
	return NULL;
}

static void _lru_unlink(struct kvrt_disk *d, struct _disk_ent *e)
{
	if (e->older)
		e->older->newer = e->newer;
	else
		d->oldest = e->newer;
	if (e->newer)
		e->newer->older = e->older;
	else
		d->newest = e->older;
	e->older = e->newer = NULL;
}

static void _lru_push_newest(struct kvrt_disk *d, struct _disk_ent *e)
{
	e->older = d->newest;
	e->newer = NULL;
	if (d->newest)
		d->newest->newer = e;
	else
		d->oldest = e;
	d->newest = e;
}

static void _grow(struct kvrt_disk *d)
{
	uint64_t n = d->nbuckets * 2;
	struct _disk_ent **nb = calloc(n, sizeof *nb);
	if (!nb)
		return; /* longer chains; still correct */
	for (uint64_t i = 0; i < d->nbuckets; i++) {
		struct _disk_ent *e = d->buckets[i];
		while (e) {
			struct _disk_ent *next = e->hnext;
			uint64_t b = e->key.lo & (n - 1);
			e->hnext = nb[b];
			nb[b] = e;
			e = next;
		}
	}
	free(d->buckets);
	d->buckets = nb;
	d->nbuckets = n;
}

/* Insert e (not in the map) as the newest entry. */
static void _insert(struct kvrt_disk *d, struct _disk_ent *e)
{
	if (d->nents >= d->nbuckets)
		_grow(d);
	uint64_t b = _bucket(d, e->key);
	e->hnext = d->buckets[b];
	d->buckets[b] = e;
	_lru_push_newest(d, e);
	d->nents++;
	d->bytes += e->file_bytes;
	_SET(d, files, d->nents);
	_SET(d, bytes, d->bytes);
}

/* Remove e from the map and the LRU and free it (the file is not touched). */
static void _forget(struct kvrt_disk *d, struct _disk_ent *e)
{
	struct _disk_ent **pp = &d->buckets[_bucket(d, e->key)];
	while (*pp != e)
		pp = &(*pp)->hnext;
	*pp = e->hnext;
	_lru_unlink(d, e);
	d->nents--;
	d->bytes -= e->file_bytes;
	_SET(d, files, d->nents);
	_SET(d, bytes, d->bytes);
	free(e);
}

/* --- completions ---------------------------------------------------------- */

static void _notify(struct kvrt_disk *d, enum kvrt_disk_event ev, struct kvrt_chunk_key k,
		    int status, uint64_t cookie, uint64_t bytes)
{
	struct kvrt_msg m = {.type = d->cfg.msg_base + (uint32_t)ev};
	m.arg.u64[0] = k.lo;
	m.arg.u64[1] = k.hi;
	m.arg.i64[2] = status;
	m.arg.u64[3] = cookie;
	m.arg.u64[4] = bytes;
	int rc = kvrt_outbox_send(&d->ob, &m);
	if (rc == 1) {
		_INC(d, notify_delayed, 1);
	} else if (rc < 0) {
		/* Nowhere to keep it: the one place a completion can be lost
		 * while running, and only when malloc fails. */
		_INC(d, notify_lost, 1);
		kvrt_error("disk %s: out of memory queueing a completion (type %u): lost", d->dir,
			   m.type);
	}
}

/* --- file helpers ----------------------------------------------------------- */

static int _open_flags(const struct kvrt_disk *d)
{
	return O_CLOEXEC | (d->odirect ? O_DIRECT : 0);
}

/* Delete e's file and forget it; report DROPPED with reason. */
static void _drop(struct kvrt_disk *d, struct _disk_ent *e, int reason)
{
	char name[_NAME_LEN];
	_key_name(e->key, ".kvc", name);
	if (unlinkat(d->dirfd, name, 0) != 0 && errno != ENOENT)
		kvrt_warn("disk %s: cannot delete %s: %s", d->dir, name, strerror(errno));
	struct kvrt_chunk_key k = e->key;
	uint64_t fb = e->file_bytes;
	_forget(d, e);
	if (reason == 0)
		_INC(d, dropped, 1);
	_notify(d, KVRT_DISK_DROPPED, k, reason, 0, fb);
}

static int _pwrite_all(int fd, const void *p, size_t n, off_t off)
{
	const uint8_t *b = p;
	while (n) {
		ssize_t w = pwrite(fd, b, n, off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (w == 0)
			return -EIO;
		b += w;
		n -= (size_t)w;
		off += w;
	}
	return 0;
}

/* Read up to n bytes; returns bytes read (short only at EOF) or -errno. */
static ssize_t _pread_all(int fd, void *p, size_t n, off_t off)
{
	uint8_t *b = p;
	size_t got = 0;
	while (got < n) {
		ssize_t r = pread(fd, b + got, n - got, off + (off_t)got);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return (ssize_t)got;
}

/* --- writes ------------------------------------------------------------------ */

static void _job_finish(struct kvrt_disk *d, struct _disk_job *j, int status)
{
	/* Pop the head (j is always the head). */
	d->jq_head = j->next;
	if (!d->jq_head)
		d->jq_tail = NULL;
	if (status == 0) {
		_INC(d, writes, 1);
		_INC(d, write_bytes, j->h.payload_len);
	} else if (status == -ENOSPC || status == -EDQUOT || status == -EFBIG || status == -E2BIG) {
		_INC(d, err_nospace, 1);
	} else if (status != -ECANCELED) {
		_INC(d, err_io, 1);
	}
	/* Decrement before notifying: a caller that saw WRITTEN finds room. */
	atomic_fetch_sub_explicit(&d->pending, 1, memory_order_relaxed);
	_notify(d, KVRT_DISK_WRITTEN, j->h.key, status, j->cookie, status ? 0 : j->h.payload_len);
	free(j);
}

/* Abandon a started job: close and delete its temp file, free the room. */
static void _job_abort(struct kvrt_disk *d, struct _disk_job *j)
{
	char tmp[_NAME_LEN];
	_key_name(j->h.key, ".tmp", tmp);
	if (j->fd >= 0)
		close(j->fd);
	j->fd = -1;
	unlinkat(d->dirfd, tmp, 0);
	j->started = false;
}

static int _job_start(struct kvrt_disk *d, struct _disk_job *j)
{
	uint64_t fb = KVRT_DISK_DATA_OFFSET + j->h.payload_len;
	if (fb > d->cfg.budget_bytes)
		return -E2BIG;
	while (d->oldest && d->bytes + fb > d->cfg.budget_bytes)
		_drop(d, d->oldest, 0);
	char tmp[_NAME_LEN];
	_key_name(j->h.key, ".tmp", tmp);
	int fd = openat(d->dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | _open_flags(d), 0600);
	if (fd < 0 && errno == ENOENT) {
		/* First file of this subdirectory (or someone removed it). */
		char sub[3] = {tmp[0], tmp[1], 0};
		mkdirat(d->dirfd, sub, 0700);
		fd = openat(d->dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | _open_flags(d), 0600);
	}
	if (fd < 0)
		return -errno;
	j->fd = fd;
	j->started = true;
	j->done = 0;
	memset(d->hdrbuf, 0, _ALIGN);
	kvrt_chunk_header_encode(&j->h, d->hdrbuf);
	kvrt_chunk_sum_begin(d->sum, d->hdrbuf);
	return 0;
}

/* Write the next piece of the payload. */
static int _job_write_piece(struct kvrt_disk *d, struct _disk_job *j)
{
	uint64_t left = j->h.payload_len - j->done;
	size_t n = left < _STEP_BYTES ? (size_t)left : _STEP_BYTES;
	const uint8_t *src = j->payload + j->done;
	off_t off = (off_t)(KVRT_DISK_DATA_OFFSET + j->done);
	kvrt_chunk_sum_update(d->sum, src, n);
	int rc;
	if (!d->odirect || (((uintptr_t)src % _ALIGN) == 0 && n % _ALIGN == 0)) {
		rc = _pwrite_all(j->fd, src, n, off);
	} else {
		/* Unaligned source or the tail: through the bounce buffer, padded
		 * with zeros to the block size (the file is truncated to its
		 * exact size at the end). */
		size_t rn = _round_up(n, _ALIGN);
		memcpy(d->bounce, src, n);
		memset(d->bounce + n, 0, rn - n);
		rc = _pwrite_all(j->fd, d->bounce, rn, off);
	}
	if (rc == 0)
		j->done += n;
	return rc;
}

static int _job_complete(struct kvrt_disk *d, struct _disk_job *j)
{
	uint64_t fb = KVRT_DISK_DATA_OFFSET + j->h.payload_len;
	kvrt_chunk_header_set_checksum(d->hdrbuf, kvrt_chunk_sum_digest(d->sum));
	int rc = _pwrite_all(j->fd, d->hdrbuf, _ALIGN, 0);
	if (rc)
		return rc;
	if (d->odirect && fb % _ALIGN && ftruncate(j->fd, (off_t)fb) != 0)
		return -errno;
	if (d->cfg.fsync && fdatasync(j->fd) != 0)
		return -errno;
	/* close() can report a deferred write error (NFS): count it. */
	int fd = j->fd;
	j->fd = -1;
	if (close(fd) != 0 && errno != EINTR)
		return -errno;
	char tmp[_NAME_LEN], name[_NAME_LEN];
	_key_name(j->h.key, ".tmp", tmp);
	_key_name(j->h.key, ".kvc", name);
	if (renameat(d->dirfd, tmp, d->dirfd, name) != 0) {
		rc = -errno;
		unlinkat(d->dirfd, tmp, 0);
		return rc;
	}
	struct _disk_ent *e = calloc(1, sizeof *e);
	if (!e) {
		unlinkat(d->dirfd, name, 0);
		return -ENOMEM;
	}
	e->key = j->h.key;
	e->file_bytes = fb;
	e->payload_len = j->h.payload_len;
	j->started = false;
	_insert(d, e);
	return 0;
}

/* One bounded step of the head job. */
static void _job_step(struct kvrt_disk *d)
{
	struct _disk_job *j = d->jq_head;
	if (!j)
		return;
	if (j->cancelled) {
		if (j->started)
			_job_abort(d, j);
		_job_finish(d, j, -ECANCELED);
		return;
	}
	int rc;
	if (!j->started) {
		struct _disk_ent *e = _find(d, j->h.key);
		if (e) {
			/* Already on disk: same key, same bytes (keys hash the
			 * content's identity). Counts as a use. */
			_lru_unlink(d, e);
			_lru_push_newest(d, e);
			_job_finish(d, j, 0);
			return;
		}
		rc = _job_start(d, j);
		if (rc) {
			_job_finish(d, j, rc);
			return;
		}
	}
	if (j->done < j->h.payload_len) {
		rc = _job_write_piece(d, j);
		if (rc == 0 && j->done < j->h.payload_len)
			return; /* more next iteration */
	} else {
		rc = 0;
	}
	if (rc == 0)
		rc = _job_complete(d, j);
	if (rc) {
		if (j->started)
			_job_abort(d, j);
		if (rc != -ENOSPC)
			kvrt_warn("disk %s: write of chunk %016" PRIx64 "%016" PRIx64 " failed: %s",
				  d->dir, j->h.key.hi, j->h.key.lo, strerror(-rc));
		else if (!d->warned_nospace) {
			/* Once: a full filesystem fails every write after this one. */
			d->warned_nospace = true;
			kvrt_warn("disk %s: the filesystem is full (%" PRIu64 " bytes of chunks here, budget %" PRIu64
				  "): chunks that do not fit are dropped instead of written; set max_local_disk_size to what it holds",
				  d->dir, d->bytes, d->cfg.budget_bytes);
		}
	}
	_job_finish(d, j, rc);
}

static void _read_step(struct kvrt_disk *d);

static void _on_step(struct ev_loop *loop, ev_check *w, int revents)
{
	(void)revents;
	struct kvrt_disk *d = w->data;
	if (d->rq_head)
		_read_step(d);
	else
		_job_step(d);
	if (!d->jq_head && !d->rq_head) {
		ev_check_stop(loop, &d->step_w);
		ev_idle_stop(loop, &d->spin_w);
	}
}

static void _on_spin(struct ev_loop *loop, ev_idle *w, int revents)
{
	(void)loop;
	(void)w;
	(void)revents; /* its only job is to make the poll non-blocking */
}

/* --- reads ------------------------------------------------------------------- */

static void _poison(void *dst, uint64_t n)
{
	if (dst && n)
		memset(dst, 0xff, n);
}

static void _do_read(struct kvrt_disk *d, struct kvrt_chunk_key k, uint8_t *dst, uint64_t cap,
		     uint64_t cookie, int pre_fd, int pre_err)
{
	struct _disk_ent *e = _find(d, k);
	if (!e) {
		if (pre_fd >= 0)
			close(pre_fd);
		_INC(d, err_missing, 1);
		_notify(d, KVRT_DISK_READ_DONE, k, -ENOENT, cookie, 0);
		return;
	}
	char name[_NAME_LEN];
	_key_name(k, ".kvc", name);
	int rc = 0;
	uint64_t touched = 0; /* bytes of dst we wrote */
	struct kvrt_chunk_header h;
	int fd = pre_fd;
	if (fd < 0 && pre_err) {
		rc = pre_err;
		goto out;
	}
	if (fd < 0 && (fd = openat(d->dirfd, name, O_RDONLY | _open_flags(d))) < 0) {
		rc = -errno;
		goto out;
	}
	ssize_t r = _pread_all(fd, d->hdrbuf, _ALIGN, 0);
	if (r < 0) {
		rc = (int)r;
		goto out;
	}
	if (kvrt_chunk_header_decode(d->hdrbuf, (size_t)r, &h) != 0 || !kvrt_chunk_key_eq(h.key, k) ||
	    h.namespace_hash != d->cfg.namespace_hash || h.payload_len != e->payload_len) {
		rc = -EBADMSG;
		goto out;
	}
	if (h.payload_len > cap) {
		rc = -EMSGSIZE;
		goto out;
	}
	struct stat st;
	if (fstat(fd, &st) != 0) {
		rc = -errno;
		goto out;
	}
	if ((uint64_t)st.st_size != KVRT_DISK_DATA_OFFSET + h.payload_len) {
		rc = -EBADMSG;
		goto out;
	}
	kvrt_chunk_sum_begin(d->sum, d->hdrbuf);
	bool direct_ok = ((uintptr_t)dst % _ALIGN) == 0;
	/* O_DIRECT into an aligned dst: one request for the whole payload
	 * (the device sees one large I/O, as dd does); hash afterwards.
	 * Buffered reads were prefetched whole (_read_prefetch). */
	size_t step = _STEP_BYTES;
	if (d->odirect && direct_ok && _round_up(h.payload_len, _ALIGN) <= cap)
		step = (size_t)h.payload_len;
	for (uint64_t done = 0; done < h.payload_len;) {
		uint64_t left = h.payload_len - done;
		size_t n = left < step ? (size_t)left : step;
		off_t off = (off_t)(KVRT_DISK_DATA_OFFSET + done);
		size_t rn = d->odirect ? _round_up(n, _ALIGN) : n;
		if (!d->odirect || (direct_ok && done + rn <= cap)) {
			if (done + rn > touched)
				touched = done + rn;
			r = _pread_all(fd, dst + done, rn, off);
		} else {
			r = _pread_all(fd, d->bounce, rn, off);
			if (r >= (ssize_t)n) {
				memcpy(dst + done, d->bounce, n);
				touched = done + n;
			}
		}
		if (r < 0) {
			rc = (int)r;
			goto out;
		}
		if ((size_t)r < n) {
			rc = -EBADMSG; /* shrank since the fstat */
			goto out;
		}
		kvrt_chunk_sum_update(d->sum, dst + done, n);
		done += n;
	}
	if (kvrt_chunk_sum_digest(d->sum) != h.checksum)
		rc = -EBADMSG;
out:
	if (rc == 0) {
		/* The mtime carries the LRU order across restarts. */
		futimens(fd, NULL);
		_lru_unlink(d, e);
		_lru_push_newest(d, e);
		_INC(d, reads, 1);
		_INC(d, read_bytes, h.payload_len);
		close(fd);
		_notify(d, KVRT_DISK_READ_DONE, k, 0, cookie, h.payload_len);
		return;
	}
	if (fd >= 0)
		close(fd);
	_poison(dst, touched < cap ? touched : cap);
	if (rc == -ENOENT) {
		_INC(d, err_missing, 1);
		kvrt_warn("disk %s: %s vanished; dropped", d->dir, name);
		_drop(d, e, -ENOENT);
	} else if (rc == -EBADMSG) {
		_INC(d, err_corrupt, 1);
		kvrt_warn("disk %s: %s is corrupt or truncated; deleted", d->dir, name);
		_drop(d, e, -EBADMSG);
	} else if (rc != -EMSGSIZE) {
		_INC(d, err_io, 1);
		kvrt_warn("disk %s: reading %s: %s", d->dir, name, strerror(-rc));
	}
	_notify(d, KVRT_DISK_READ_DONE, k, rc, cookie, 0);
}

/* Buffered reads: open the next queued files and ask the kernel for them
 * whole (POSIX_FADV_WILLNEED), so the device streams the next chunks while
 * this one is copied and hashed: one chunk per file otherwise costs a
 * readahead ramp-up per file (measured: 32 files of 8 MiB read ~30% slower
 * than one file). Bounded to _AHEAD_BYTES and _AHEAD_FILES so a deep queue
 * does not flood the page cache. O_DIRECT bypasses the page cache: no
 * prefetch. */
#define _AHEAD_BYTES (256ull << 20)
#define _AHEAD_FILES 8u

static void _read_prefetch(struct kvrt_disk *d)
{
	if (d->odirect)
		return;
	for (struct _disk_rjob *r = d->rq_head; r; r = r->next) {
		if (d->rq_ahead >= _AHEAD_FILES || d->rq_ahead_bytes >= _AHEAD_BYTES)
			return;
		if (r->prefetched)
			continue;
		r->prefetched = true;
		struct _disk_ent *e = _find(d, r->key);
		if (!e)
			continue; /* _do_read reports the miss */
		char name[_NAME_LEN];
		_key_name(r->key, ".kvc", name);
		r->fd = openat(d->dirfd, name, O_RDONLY | O_CLOEXEC);
		if (r->fd < 0) {
			r->open_err = -errno;
			continue;
		}
		posix_fadvise(r->fd, 0, 0, POSIX_FADV_WILLNEED);
		r->bytes = e->file_bytes;
		d->rq_ahead++;
		d->rq_ahead_bytes += r->bytes;
	}
}

/* Serve the head of the read FIFO. */
static void _read_step(struct kvrt_disk *d)
{
	struct _disk_rjob *r = d->rq_head;
	d->rq_head = r->next;
	if (!d->rq_head)
		d->rq_tail = NULL;
	if (r->fd >= 0) {
		d->rq_ahead--;
		d->rq_ahead_bytes -= r->bytes;
	}
	_do_read(d, r->key, r->dst, r->cap, r->cookie, r->fd, r->open_err);
	free(r);
	_read_prefetch(d);
}

/* --- removes ------------------------------------------------------------------ */

static void _do_remove(struct kvrt_disk *d, struct kvrt_chunk_key k)
{
	bool hit = false;
	for (struct _disk_job *j = d->jq_head; j; j = j->next)
		if (kvrt_chunk_key_eq(j->h.key, k) && !j->cancelled) {
			j->cancelled = true;
			hit = true;
		}
	uint64_t freed = 0;
	struct _disk_ent *e = _find(d, k);
	if (e) {
		char name[_NAME_LEN];
		_key_name(k, ".kvc", name);
		if (unlinkat(d->dirfd, name, 0) != 0 && errno != ENOENT)
			kvrt_warn("disk %s: cannot delete %s: %s", d->dir, name, strerror(errno));
		freed = e->file_bytes;
		_forget(d, e);
		_INC(d, removed, 1);
		hit = true;
	}
	_notify(d, KVRT_DISK_REMOVED, k, hit ? 0 : -ENOENT, 0, freed);
}

/* --- the actor ---------------------------------------------------------------- */

static void _handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct kvrt_disk *d = kvrt_actor_data(a);
	struct kvrt_chunk_key k = {.lo = m->arg.u64[0], .hi = m->arg.u64[1]};
	switch (m->type) {
	case _MSG_WRITE: {
		struct _disk_job *j = m->arg.ptr[0];
		if (d->jq_tail)
			d->jq_tail->next = j;
		else
			d->jq_head = j;
		d->jq_tail = j;
		struct ev_loop *loop = kvrt_actor_loop(a);
		ev_check_start(loop, &d->step_w);
		ev_idle_start(loop, &d->spin_w);
		break;
	}
	case _MSG_READ: {
		struct _disk_rjob *r = malloc(sizeof *r);
		if (!r) {
			/* Serve it now rather than fail it. */
			_do_read(d, k, m->arg.ptr[2], m->arg.u64[3], m->arg.u64[4], -1, 0);
			break;
		}
		*r = (struct _disk_rjob){.key = k, .dst = m->arg.ptr[2], .cap = m->arg.u64[3],
					 .cookie = m->arg.u64[4], .fd = -1};
		if (d->rq_tail)
			d->rq_tail->next = r;
		else
			d->rq_head = r;
		d->rq_tail = r;
		_read_prefetch(d);
		struct ev_loop *loop = kvrt_actor_loop(a);
		ev_check_start(loop, &d->step_w);
		ev_idle_start(loop, &d->spin_w);
		break;
	}
	case _MSG_REMOVE:
		_do_remove(d, k);
		break;
	default:
		KVRT_ASSERT(!"unknown disk message");
	}
}

static int _start(struct kvrt_actor *a)
{
	struct kvrt_disk *d = kvrt_actor_data(a);
	d->self = a;
	kvrt_outbox_init(&d->ob, d->cfg.notify, kvrt_actor_loop(a), _NOTIFY_RETRY_S);
	return 0;
}

static void _stop(struct kvrt_actor *a)
{
	struct kvrt_disk *d = kvrt_actor_data(a);
	struct ev_loop *loop = kvrt_actor_loop(a);
	/* Every accepted write is finished, then every completion delivered. */
	while (d->rq_head)
		_read_step(d);
	while (d->jq_head)
		_job_step(d);
	ev_check_stop(loop, &d->step_w);
	ev_idle_stop(loop, &d->spin_w);
	int rc;
	uint32_t lost = kvrt_outbox_close(&d->ob, kvrt_now_ns() + _CLOSE_NOTIFY_NS, &rc);
	if (lost) {
		_INC(d, notify_lost, lost);
		kvrt_error("disk %s: %u completions could not be delivered at close: %s", d->dir,
			   lost, strerror(-rc));
	}
}

static const char *_msg_name(uint32_t type)
{
	switch (type) {
	case _MSG_WRITE:
		return "disk.write";
	case _MSG_READ:
		return "disk.read";
	case _MSG_REMOVE:
		return "disk.remove";
	default:
		return NULL;
	}
}

static const struct kvrt_actor_ops _disk_ops = {
	.handle = _handle,
	.start = _start,
	.stop = _stop,
	.msg_name = _msg_name,
};

/* --- open: scan ------------------------------------------------------------------ */

/* A candidate found by the scan. */
struct _found {
	struct kvrt_chunk_header h;
	int64_t mtime_ns;
};

static int _cmp_found(const void *a, const void *b)
{
	const struct _found *x = a, *y = b;
	if (x->mtime_ns != y->mtime_ns)
		return x->mtime_ns < y->mtime_ns ? -1 : 1;
	if (x->h.key.hi != y->h.key.hi)
		return x->h.key.hi < y->h.key.hi ? -1 : 1;
	return x->h.key.lo < y->h.key.lo ? -1 : x->h.key.lo > y->h.key.lo;
}

static void _skip(struct kvrt_disk *d, const char *path, const char *why, bool del)
{
	_INC(d, skipped, 1);
	if (del && unlinkat(d->dirfd, path, 0) == 0)
		kvrt_warn("disk %s: %s %s; deleted", d->dir, path, why);
	else
		kvrt_warn("disk %s: %s %s; skipped", d->dir, path, why);
}

/* Check one "<sub>/<name>" file; on success append it to *v. */
static int _scan_file(struct kvrt_disk *d, int subfd, const char *sub, const char *name,
		      struct _found **v, size_t *n, size_t *cap)
{
	char path[300];
	snprintf(path, sizeof path, "%s/%s", sub, name);
	struct kvrt_chunk_key k;
	if (_parse_name(name, ".tmp", &k)) {
		/* A write a crash interrupted. */
		unlinkat(subfd, name, 0);
		kvrt_info("disk %s: removed stale temp file %s", d->dir, path);
		return 0;
	}
	if (!_parse_name(name, ".kvc", &k) || (unsigned)(k.hi >> 56) != strtoul(sub, NULL, 16)) {
		_skip(d, path, "is not a kvrt chunk file", false);
		return 0;
	}
	int fd = openat(subfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		_skip(d, path, strerror(errno), false);
		return 0;
	}
	struct stat st;
	uint8_t hb[KVRT_CHUNK_HEADER_SIZE];
	struct kvrt_chunk_header h;
	ssize_t r = -1;
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
		r = _pread_all(fd, hb, sizeof hb, 0);
	close(fd);
	if (r < 0) {
		_skip(d, path, "cannot be read", false);
		return 0;
	}
	if (kvrt_chunk_header_decode(hb, (size_t)r, &h) != 0) {
		_skip(d, path, "has no valid chunk header", false);
		return 0;
	}
	if (h.namespace_hash != d->cfg.namespace_hash) {
		_skip(d, path, "belongs to another namespace (model, rank or layout)", false);
		return 0;
	}
	if (!kvrt_chunk_key_eq(h.key, k)) {
		_skip(d, path, "holds a chunk of another key", true);
		return 0;
	}
	if ((uint64_t)st.st_size != KVRT_DISK_DATA_OFFSET + h.payload_len) {
		_skip(d, path, "is truncated (size does not match its header)", true);
		return 0;
	}
	if (*n == *cap) {
		size_t nc = *cap ? *cap * 2 : 256;
		struct _found *nv = realloc(*v, nc * sizeof *nv);
		if (!nv)
			return -ENOMEM;
		*v = nv;
		*cap = nc;
	}
	(*v)[(*n)++] = (struct _found){
		.h = h,
		.mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec,
	};
	return 0;
}

static int _scan(struct kvrt_disk *d)
{
	struct _found *v = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;

	/* Top level: the lock, the 256 subdirectories, nothing else. */
	int tfd = openat(d->dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *top = tfd >= 0 ? fdopendir(tfd) : NULL;
	if (!top) {
		rc = -errno;
		if (tfd >= 0)
			close(tfd);
		return rc;
	}
	for (struct dirent *de; (de = readdir(top));) {
		const char *nm = de->d_name;
		if (!strcmp(nm, ".") || !strcmp(nm, "..") || !strcmp(nm, "lock"))
			continue;
		bool sub = strlen(nm) == 2 && _hexval(nm[0]) >= 0 && _hexval(nm[1]) >= 0;
		if (!sub)
			_skip(d, nm, "is not part of a kvrt disk tier", false);
	}
	closedir(top);

	for (unsigned b = 0; b < 256 && rc == 0; b++) {
		char sub[3];
		snprintf(sub, sizeof sub, "%02x", b);
		int sfd = openat(d->dirfd, sub, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (sfd < 0 && errno == ENOENT)
			continue; /* created by the first write into it */
		DIR *dp = sfd >= 0 ? fdopendir(sfd) : NULL;
		if (!dp) {
			rc = -errno;
			if (sfd >= 0)
				close(sfd);
			kvrt_error("disk %s: cannot open %s: %s", d->dir, sub, strerror(-rc));
			break;
		}
		for (struct dirent *de; rc == 0 && (de = readdir(dp));) {
			if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
				continue;
			rc = _scan_file(d, dirfd(dp), sub, de->d_name, &v, &n, &cap);
		}
		closedir(dp);
	}
	if (rc) {
		free(v);
		return rc;
	}

	/* Oldest first; beyond the budget (it was lowered), oldest go. */
	if (n)
		qsort(v, n, sizeof *v, _cmp_found);
	uint64_t total = 0;
	for (size_t i = 0; i < n; i++)
		total += KVRT_DISK_DATA_OFFSET + v[i].h.payload_len;
	size_t first = 0;
	while (first < n && total > d->cfg.budget_bytes) {
		char name[_NAME_LEN];
		_key_name(v[first].h.key, ".kvc", name);
		unlinkat(d->dirfd, name, 0);
		total -= KVRT_DISK_DATA_OFFSET + v[first].h.payload_len;
		first++;
	}
	if (first)
		kvrt_info("disk %s: deleted %zu oldest chunks above the budget of %" PRIu64 " bytes",
			  d->dir, first, d->cfg.budget_bytes);
	for (size_t i = first; i < n; i++) {
		struct _disk_ent *e = calloc(1, sizeof *e);
		if (!e) {
			free(v);
			return -ENOMEM;
		}
		e->key = v[i].h.key;
		e->payload_len = v[i].h.payload_len;
		e->file_bytes = KVRT_DISK_DATA_OFFSET + e->payload_len;
		_insert(d, e);
	}
	_SET(d, found, n - first);
	if (d->cfg.on_found)
		for (size_t i = first; i < n; i++)
			d->cfg.on_found(d->cfg.ctx, &v[i].h);
	free(v);
	return 0;
}

/* Can files in the directory be opened and written with O_DIRECT? */
static bool _probe_odirect(struct kvrt_disk *d)
{
	const char *probe = "odirect.probe.tmp";
	int fd = openat(d->dirfd, probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0600);
	if (fd < 0) {
		kvrt_info("disk %s: O_DIRECT refused (%s); using buffered I/O", d->dir,
			  strerror(errno));
		return false;
	}
	bool ok = pwrite(fd, d->hdrbuf, _ALIGN, 0) == (ssize_t)_ALIGN;
	if (!ok)
		kvrt_info("disk %s: O_DIRECT write refused (%s); using buffered I/O", d->dir,
			  strerror(errno));
	close(fd);
	unlinkat(d->dirfd, probe, 0);
	return ok;
}

static void _free_all(struct kvrt_disk *d)
{
	if (d->buckets) {
		for (uint64_t i = 0; i < d->nbuckets; i++)
			for (struct _disk_ent *e = d->buckets[i], *nx; e; e = nx) {
				nx = e->hnext;
				free(e);
			}
		free(d->buckets);
	}
	kvrt_chunk_sum_destroy(d->sum);
	free(d->hdrbuf);
	free(d->bounce);
	kvrt_outbox_free(&d->ob);
	if (d->lockfd >= 0)
		close(d->lockfd); /* releases the flock */
	if (d->dirfd >= 0)
		close(d->dirfd);
	free(d->dir);
	free(d);
}

int kvrt_disk_open(struct kvrt_disk **out, const struct kvrt_disk_config *cfg)
{
	*out = NULL;
	if (!cfg || !cfg->dir || !*cfg->dir) {
		kvrt_error("disk: local_disk: a directory is required");
		return -EINVAL;
	}
	if (cfg->budget_bytes <= KVRT_DISK_DATA_OFFSET) {
		kvrt_error("disk %s: max_local_disk_size must be more than %u bytes", cfg->dir,
			   KVRT_DISK_DATA_OFFSET);
		return -EINVAL;
	}
	if (!cfg->notify) {
		kvrt_error("disk %s: a notify actor is required", cfg->dir);
		return -EINVAL;
	}
	uint32_t mbox = cfg->mailbox_size ? cfg->mailbox_size : 1024;
	if (mbox < 4 || (mbox & (mbox - 1))) {
		kvrt_error("disk %s: mailbox_size must be a power of two >= 4", cfg->dir);
		return -EINVAL;
	}

	int rc = -ENOMEM;
	struct kvrt_disk *d = calloc(1, sizeof *d);
	if (!d)
		return -ENOMEM;
	d->dirfd = d->lockfd = -1;
	d->cfg = *cfg;
	d->dir = strdup(cfg->dir);
	d->nbuckets = 1024;
	d->buckets = calloc(d->nbuckets, sizeof *d->buckets);
	d->sum = kvrt_chunk_sum_create();
	d->hdrbuf = aligned_alloc(_ALIGN, _ALIGN);
	if (!d->dir || !d->buckets || !d->sum || !d->hdrbuf)
		goto err;
	d->cfg.dir = d->dir;
	memset(d->hdrbuf, 0, _ALIGN);
	d->max_pending = cfg->max_pending_writes ? cfg->max_pending_writes : 64;

	if (mkdir(d->dir, 0700) != 0 && errno != EEXIST) {
		rc = -errno;
		kvrt_error("disk: cannot create local_disk directory %s: %s", d->dir,
			   strerror(errno));
		goto err;
	}
	d->dirfd = open(d->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (d->dirfd < 0) {
		rc = -errno;
		kvrt_error("disk: cannot open local_disk directory %s: %s", d->dir, strerror(errno));
		goto err;
	}
	d->lockfd = openat(d->dirfd, "lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (d->lockfd < 0) {
		rc = -errno;
		kvrt_error("disk %s: cannot create the lock file: %s", d->dir, strerror(errno));
		goto err;
	}
	if (flock(d->lockfd, LOCK_EX | LOCK_NB) != 0) {
		rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
		kvrt_error("disk: local_disk directory %s is in use by another kvrt engine (%s); give each engine (each rank) its own directory",
			   d->dir, strerror(errno));
		goto err;
	}
	if (cfg->use_odirect) {
		d->odirect = _probe_odirect(d);
		if (d->odirect) {
			d->bounce = aligned_alloc(_ALIGN, _STEP_BYTES);
			if (!d->bounce) {
				rc = -ENOMEM;
				goto err;
			}
		}
	}
	rc = _scan(d);
	if (rc)
		goto err;
	_SET(d, bytes, d->bytes);

	ev_check_init(&d->step_w, _on_step);
	d->step_w.data = d;
	ev_idle_init(&d->spin_w, _on_spin);
	d->spin_w.data = d;
	rc = kvrt_actor_create(&d->actor, &(struct kvrt_actor_config){
						  .name = "disk",
						  .mailbox_size = mbox,
						  .ops = &_disk_ops,
						  .data = d,
					  });
	if (rc)
		goto err;
	kvrt_info("disk %s: %" PRIu64 " chunks, %" PRIu64 " of %" PRIu64 " bytes%s", d->dir,
		  d->nents, d->bytes, d->cfg.budget_bytes, d->odirect ? ", O_DIRECT" : "");
	*out = d;
	return 0;
err:
	_free_all(d);
	return rc;
}

/* --- any thread ----------------------------------------------------------------- */

static int _post(struct kvrt_disk *d, const struct kvrt_msg *m)
{
	/* Timeout 0: one attempt; full is -ETIMEDOUT, stopping -ESHUTDOWN. */
	int rc = kvrt_actor_post(d->actor, m, 0);
	if (rc == -ETIMEDOUT || rc == -EDEADLK)
		rc = -EAGAIN;
	if (rc == -EAGAIN)
		_INC(d, rejected, 1);
	return rc;
}

int kvrt_disk_write(struct kvrt_disk *d, const struct kvrt_chunk_header *h, const void *payload,
		    uint64_t cookie)
{
	if (!h || (!payload && h->payload_len) || h->namespace_hash != d->cfg.namespace_hash ||
	    h->format_version != KVRT_CHUNK_FORMAT_VERSION ||
	    h->header_size != KVRT_CHUNK_HEADER_SIZE)
		return -EINVAL;
	/* The decoder's checks, so nothing is written that open would refuse. */
	uint8_t enc[KVRT_CHUNK_HEADER_SIZE];
	struct kvrt_chunk_header t;
	kvrt_chunk_header_encode(h, enc);
	if (kvrt_chunk_header_decode(enc, sizeof enc, &t) != 0)
		return -EINVAL;
	if (atomic_fetch_add_explicit(&d->pending, 1, memory_order_relaxed) >= d->max_pending) {
		atomic_fetch_sub_explicit(&d->pending, 1, memory_order_relaxed);
		_INC(d, rejected, 1);
		return -EAGAIN;
	}
	struct _disk_job *j = calloc(1, sizeof *j);
	if (!j) {
		atomic_fetch_sub_explicit(&d->pending, 1, memory_order_relaxed);
		return -ENOMEM;
	}
	j->h = t;
	j->h.checksum = 0;
	j->payload = payload;
	j->cookie = cookie;
	j->fd = -1;
	struct kvrt_msg m = {.type = _MSG_WRITE};
	m.arg.ptr[0] = j;
	int rc = _post(d, &m);
	if (rc) {
		atomic_fetch_sub_explicit(&d->pending, 1, memory_order_relaxed);
		free(j);
	}
	return rc;
}

int kvrt_disk_read(struct kvrt_disk *d, struct kvrt_chunk_key key, void *dst, uint64_t cap,
		   uint64_t cookie)
{
	struct kvrt_msg m = {.type = _MSG_READ};
	m.arg.u64[0] = key.lo;
	m.arg.u64[1] = key.hi;
	m.arg.ptr[2] = dst;
	m.arg.u64[3] = dst ? cap : 0;
	m.arg.u64[4] = cookie;
	return _post(d, &m);
}

int kvrt_disk_remove(struct kvrt_disk *d, struct kvrt_chunk_key key)
{
	struct kvrt_msg m = {.type = _MSG_REMOVE};
	m.arg.u64[0] = key.lo;
	m.arg.u64[1] = key.hi;
	return _post(d, &m);
}

void kvrt_disk_stats(struct kvrt_disk *d, struct kvrt_disk_stats *o)
{
	*o = (struct kvrt_disk_stats){
		.files = _GET(d, files),
		.bytes = _GET(d, bytes),
		.budget = d->cfg.budget_bytes,
		.writes = _GET(d, writes),
		.write_bytes = _GET(d, write_bytes),
		.reads = _GET(d, reads),
		.read_bytes = _GET(d, read_bytes),
		.found = _GET(d, found),
		.skipped = _GET(d, skipped),
		.dropped = _GET(d, dropped),
		.removed = _GET(d, removed),
		.err_nospace = _GET(d, err_nospace),
		.err_io = _GET(d, err_io),
		.err_corrupt = _GET(d, err_corrupt),
		.err_missing = _GET(d, err_missing),
		.rejected = _GET(d, rejected),
		.notify_delayed = _GET(d, notify_delayed),
		.notify_lost = _GET(d, notify_lost),
		.odirect = d->odirect,
	};
}

void kvrt_disk_close(struct kvrt_disk *d)
{
	if (!d)
		return;
	kvrt_actor_destroy(d->actor); /* stop: handle all accepted, _stop drains */
	d->actor = NULL;
	_free_all(d);
}
