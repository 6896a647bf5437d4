/* actors/evict.c: see evict.h.
 *
 * Everything below the "actor thread" line runs on the evict actor's thread,
 * the index's single writer. The disk tier is opened and closed on the
 * owner's thread (kvrt_evict_create/destroy, the disk's rule), its found
 * chunks handed to the actor in one REINDEX call; DETACH makes the actor
 * stop issuing disk requests before the owner closes it, while the actor
 * keeps handling the completions the close delivers. The remote tier
 * (actors/remote.h) is attached and detached the same way (ATTACH_REMOTE /
 * DETACH_REMOTE around kvrt_remote_open / kvrt_remote_close).
 */
#include "actors/evict.h"

#include <errno.h>
#include <ev.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "actors/disk.h"
#include "actors/remote.h"
#include "actors/tier_events.h"
#include "runtime/log.h"

/* Writer-only entry flags beyond the index's (entry->flags). */
enum {
	F_ON_DISK = 1u << 8, /* a verified copy is in the disk tier */
	F_LOST = 1u << 9,    /* the entry must go (a disk-only entry whose file is gone, or a CPU
			      * copy a load found corrupt): retire when unpinned and idle */
	F_RWRITING = 1u << 10, /* write-behind to Redis in flight: slab read, never evicted */
	F_RLIST = 1u << 11,  /* a REMOTE entry, in ev->rl (owner_data: when indexed) */
	F_RLOST = 1u << 12,  /* REMOTE entry whose read failed: retire when unpinned */
	F_DISCARD = 1u << 13, /* CPU copy a load found corrupt (also F_LOST): never served again */
	F_DETACHED = 1u << 14, /* out of the index while pinned (kvrt_index_detach): in ev->lost
				* until its pins are gone, then its slab and the entry are freed */
	F_IN_REMOTE = 1u << 15, /* a write-behind stored it in Redis */
	F_RGONE = 1u << 16,     /* a read found it no longer in Redis */
};

/* REMOTE entries nobody promoted are dropped after this (unpinned). */
#define _REMOTE_ENTRY_TTL_NS (2ull * 1000000000ull)

/* Internal message types. */
enum {
	_MSG_REINDEX = 32, /* arg.ptr[0]: struct _found *, u64[1]: count, ptr[2]: disk */
	_MSG_DETACH = 33,  /* stop issuing disk requests */
	_MSG_ATTACH_REMOTE = 34, /* arg.ptr[0]: struct kvrt_remote * */
	_MSG_DETACH_REMOTE = 35, /* stop issuing remote requests */
};

/* A remote find in flight (the EXISTS request's cookie; the actor frees it). */
struct _rfind {
	struct kvrt_completion *c; /* caller's */
	uint32_t n;                /* keys */
	uint32_t num_tokens;       /* tokens of each chunk */
	uint32_t last_tokens;      /* tokens of the last one (0: num_tokens) */
	struct kvrt_chunk_key keys[]; /* [n] */
};

/* A chunk found on disk at open. */
struct _found {
	struct kvrt_chunk_key key; /* its key */
	uint64_t payload_len;      /* payload bytes */
	uint64_t checksum;         /* header checksum */
	uint32_t num_tokens;       /* tokens */
};

struct _found_vec {
	struct _found *v; /* records */
	size_t n, cap;    /* used, allocated */
	bool oom;         /* a record was lost for memory */
};

/* A promotion waiting for a slab: every slab is held, but a demotion's
 * disk write in flight frees one when it ends. */
struct _starved {
	struct kvrt_chunk_key key;   /* the chunk to promote */
	struct kvrt_completion *c;   /* caller's completion */
	uint64_t since_ns;           /* queued at */
	struct _starved *next;       /* FIFO */
};

/* A starved promotion fails (-ENOBUFS) after this long. */
#define _STARVED_MAX_NS (2ull * 1000000000ull)

/* A promote request waiting for a disk read. */
struct _waiter {
	struct kvrt_index_entry *e;  /* the entry being read (F_READING) */
	struct kvrt_completion *c;   /* caller's completion */
	struct _waiter *next;        /* list */
};

#define STAT(ev, f) _Atomic uint64_t f
struct kvrt_evict {
	struct kvrt_actor *actor;    /* the actor */
	struct kvrt_evict_config cfg; /* copy; disk_dir points into dir */
	char *dir;                   /* copy of disk_dir */
	struct kvrt_index *idx;      /* the index (we write) */
	struct kvrt_pool *pool;      /* the pool (we own its free list) */
	struct kvrt_policy *pol;     /* CPU order */
	struct kvrt_disk *disk;      /* attached disk tier (actor thread), or NULL */
	struct kvrt_disk *disk_owner; /* the same, owner thread's copy for close */
	struct kvrt_remote *remote;  /* attached remote tier (actor thread), or NULL */
	struct kvrt_remote *remote_owner; /* the same, owner thread's copy for close */
	char *url;                   /* copy of remote_url */
	uint32_t rwriting;           /* write-behinds in flight */
	struct kvrt_index_entry **rl; /* REMOTE entries (F_RLIST) */
	uint32_t rl_n, rl_cap;       /* used, allocated */
	ev_timer tick;               /* housekeeping timer */
	uint32_t slabs;              /* pool slabs */
	uint32_t high, low;          /* watermarks in slabs */
	uint32_t writing;            /* disk writes in flight (slabs to be freed) */
	uint32_t reading;            /* disk reads in flight (slabs taken) */
	struct kvrt_index_entry **skip; /* scratch: victims that could not go */
	struct kvrt_index_entry **lost; /* disk-only entries to retire when unpinned */
	uint32_t lost_n, lost_cap;   /* used, allocated */
	struct _waiter *waiters;     /* promote requests in flight */
	struct _starved *starved, **starved_tail; /* promotions waiting for a slab */
	uint64_t removed;            /* retirements since the last gc */
	struct kvrt_tier_events *te; /* tier events (cfg.tier_events), or NULL */
	/* Counters, written by the actor, read by anyone (relaxed). */
	STAT(ev, admitted);
	STAT(ev, admit_dup);
	STAT(ev, admit_failed);
	STAT(ev, evicted);
	STAT(ev, demoted);
	STAT(ev, demote_failed);
	STAT(ev, demote_skipped);
	STAT(ev, evict_blocked);
	STAT(ev, promoted);
	STAT(ev, promote_failed);
	STAT(ev, disk_dropped);
	STAT(ev, disk_found);
	STAT(ev, pins_expired);
	STAT(ev, cpu_entries);
	STAT(ev, disk_entries);
	STAT(ev, remote_writes);
	STAT(ev, remote_write_dropped);
	STAT(ev, remote_write_failed);
	STAT(ev, remote_finds);
	STAT(ev, remote_found);
	STAT(ev, remote_find_missed);
	STAT(ev, remote_reads);
	STAT(ev, remote_hits);
	STAT(ev, remote_misses);
	STAT(ev, remote_errors);
	STAT(ev, remote_entries);
	STAT(ev, discarded);
};
#undef STAT

#define INC(ev, f) atomic_fetch_add_explicit(&(ev)->f, 1, memory_order_relaxed)
#define DEC(ev, f) atomic_fetch_sub_explicit(&(ev)->f, 1, memory_order_relaxed)
#define GET(ev, f) atomic_load_explicit(&(ev)->f, memory_order_relaxed)

/* --- tier events ------------------------------------------------------------ */

/* Where e is loadable from now. A copy a load found corrupt, or whose disk
 * file is gone, is loadable from nowhere local; Redis keeps what it was
 * given until a read finds it gone (F_RGONE). */
static uint8_t media_of(const struct kvrt_index_entry *e)
{
	uint8_t m = 0;
	enum kvrt_tier t = kvrt_index_entry_tier((struct kvrt_index_entry *)e);
	if (!(e->flags & (F_LOST | F_DISCARD | F_DETACHED))) {
		if (t == KVRT_TIER_CPU)
			m |= KVRT_MEDIUM_CPU;
		if ((e->flags & F_ON_DISK) || t == KVRT_TIER_DISK)
			m |= KVRT_MEDIUM_DISK;
	}
	if (((e->flags & F_IN_REMOTE) || t == KVRT_TIER_REMOTE) && !(e->flags & F_RGONE))
		m |= KVRT_MEDIUM_REMOTE;
	return m;
}

/* e's media may have changed: say what did (no-op when events are off). */
static void media_sync(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	if (!ev->te)
		return;
	uint8_t now = media_of(e);
	kvrt_tier_events_diff(ev->te, e->key, e->media, now);
	e->media = now;
}

/* e leaves the index: its local copies go; a Redis copy stays in Redis
 * (only this index forgets it) unless a read found it gone. */
static void media_gone(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	if (!ev->te)
		return;
	uint8_t now = (e->flags & F_RGONE) ? 0 : (e->media & KVRT_MEDIUM_REMOTE);
	kvrt_tier_events_diff(ev->te, e->key, e->media, now);
	e->media = now;
}

/* ===================== actor thread ===================================== */

static uint32_t occupancy(struct kvrt_evict *ev)
{
	struct kvrt_pool_stats st;
	kvrt_pool_stats(ev->pool, &st);
	uint32_t held = st.free + st.ring + ev->writing;
	return held >= ev->slabs ? 0 : ev->slabs - held;
}

static void free_slab_of(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	uint32_t s = atomic_load_explicit(&e->slab, memory_order_relaxed);
	atomic_store_explicit(&e->slab, KVRT_POOL_NO_SLAB, memory_order_relaxed);
	kvrt_pool_free(ev->pool, s);
}

/* Retire e (not in the policy). true: gone. false: pinned, nothing changed. */
static bool retire(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	enum kvrt_tier t = kvrt_index_entry_tier(e);
	bool on_disk = e->flags & F_ON_DISK;
	struct kvrt_chunk_key key = e->key;
	uint32_t slab = atomic_load_explicit(&e->slab, memory_order_relaxed);
	if (!kvrt_index_try_retire(ev->idx, e))
		return false;
	media_gone(ev, e);
	/* e is freed after the grace period; only our copies are used now. */
	if (t == KVRT_TIER_CPU) {
		kvrt_pool_free(ev->pool, slab);
		DEC(ev, cpu_entries);
	} else if (t == KVRT_TIER_REMOTE) {
		DEC(ev, remote_entries);
	} else {
		DEC(ev, disk_entries);
	}
	if (on_disk && ev->disk)
		(void)kvrt_disk_remove(ev->disk, key); /* -EAGAIN: the disk LRU drops it later */
	ev->removed++;
	return true;
}

static void lost_add(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	if (e->flags & F_LOST)
		return;
	if (ev->lost_n == ev->lost_cap) {
		uint32_t cap = ev->lost_cap ? 2 * ev->lost_cap : 64;
		struct kvrt_index_entry **l = realloc(ev->lost, cap * sizeof(*l));
		if (!l) {
			kvrt_warn("evict: no memory to track a chunk to drop; it stays a hit that fails to load");
			return;
		}
		ev->lost = l;
		ev->lost_cap = cap;
	}
	e->flags |= F_LOST;
	ev->lost[ev->lost_n++] = e;
}

/* A discarded CPU entry leaves the index now, pinned or not (no lookup
 * finds it, a fresh copy of its key may be admitted); its slab stays until
 * its pins are gone (lost_sweep). Its disk copy goes at once. */
static void discard_detach(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	kvrt_index_detach(ev->idx, e);
	e->flags |= F_DETACHED;
	media_gone(ev, e);
	DEC(ev, cpu_entries);
	if ((e->flags & F_ON_DISK) && ev->disk)
		(void)kvrt_disk_remove(ev->disk, e->key);
	e->flags &= ~F_ON_DISK;
	ev->removed++;
}

/* Lost entries: retire those no longer pinned nor read or written by a
 * tier (a slab a disk or Redis write still reads is freed only after it);
 * a discarded one still pinned leaves the index at once (detached); a
 * detached one is freed with its slab when its last pin is gone. */
static void lost_sweep(struct kvrt_evict *ev)
{
	uint32_t j = 0;
	for (uint32_t i = 0; i < ev->lost_n; i++) {
		struct kvrt_index_entry *e = ev->lost[i];
		if (e->flags & F_DETACHED) {
			uint32_t slab = atomic_load_explicit(&e->slab, memory_order_relaxed);
			if (kvrt_index_try_release_detached(ev->idx, e)) {
				kvrt_pool_free(ev->pool, slab);
				continue;
			}
		} else if (!(e->flags & (KVRT_INDEX_F_READING | KVRT_INDEX_F_WRITING | F_RWRITING))) {
			if (retire(ev, e))
				continue;
			if (e->flags & F_DISCARD)
				discard_detach(ev, e);
		}
		ev->lost[j++] = e;
	}
	ev->lost_n = j;
}

static void header_of(struct kvrt_evict *ev, struct kvrt_index_entry *e, struct kvrt_chunk_header *h)
{
	memset(h, 0, sizeof(*h));
	h->format_version = KVRT_CHUNK_FORMAT_VERSION;
	h->header_size = KVRT_CHUNK_HEADER_SIZE;
	h->namespace_hash = ev->cfg.namespace_hash;
	h->key = e->key;
	h->shape = ev->cfg.shape;
	h->num_tokens = e->num_tokens;
	h->payload_len = e->bytes;
}

/* Try to move victim e out of the CPU tier. true: done (or started: a disk
 * write in flight); false: it must stay (pinned). */
static bool evict_one(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	if (kvrt_index_state_pins(atomic_load_explicit(&e->state, memory_order_acquire)))
		return false;
	if (e->flags & F_RWRITING)
		return false; /* Redis is reading its slab */
	if (ev->disk) {
		if (e->flags & F_ON_DISK) {
			if (!kvrt_index_try_demote(e, KVRT_TIER_DISK))
				return false;
			free_slab_of(ev, e);
			DEC(ev, cpu_entries);
			INC(ev, disk_entries);
			INC(ev, demoted);
			media_sync(ev, e);
			return true;
		}
		struct kvrt_chunk_header h;
		header_of(ev, e, &h);
		uint32_t slab = atomic_load_explicit(&e->slab, memory_order_relaxed);
		int rc = kvrt_disk_write(ev->disk, &h, kvrt_pool_addr(ev->pool, slab), 0);
		if (rc == 0) {
			/* The slab stays until WRITTEN; readers may still pin and
			 * load it meanwhile. */
			e->flags |= KVRT_INDEX_F_WRITING;
			ev->writing++;
			return true;
		}
		INC(ev, demote_skipped);
	}
	if (!retire(ev, e))
		return false;
	INC(ev, evicted);
	return true;
}

/* Evict down to the low watermark when above the high one (or when force,
 * at least `force` slabs). Never waits. */
static void evict_pass(struct kvrt_evict *ev, uint32_t force)
{
	uint32_t occ = occupancy(ev);
	if (occ <= ev->high && !force)
		return;
	uint32_t target = ev->low;
	if (force && occ >= force && occ - force < target)
		target = occ - force;
	uint32_t nskip = 0;
	while (occ > target) {
		struct kvrt_index_entry *e = kvrt_policy_victim(ev->pol);
		if (!e) {
			INC(ev, evict_blocked);
			break;
		}
		if (evict_one(ev, e))
			occ--;
		else
			ev->skip[nskip++] = e;
	}
	for (uint32_t i = nskip; i > 0; i--)
		kvrt_policy_putback(ev->pol, ev->skip[i - 1]);
}

static void refill(struct kvrt_evict *ev)
{
	evict_pass(ev, 0);
	kvrt_pool_refill(ev->pool, 0);
}

/* Start the write-behind of a newly admitted CPU entry. Dropped (counted)
 * when the tier refuses it: a full queue or a server down never waits. */
static void remote_write_behind(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	if (!ev->remote)
		return;
	struct kvrt_chunk_header h;
	header_of(ev, e, &h);
	uint32_t slab = atomic_load_explicit(&e->slab, memory_order_relaxed);
	int rc = kvrt_remote_write(ev->remote, &h, kvrt_pool_addr(ev->pool, slab), 0);
	if (rc) {
		INC(ev, remote_write_dropped);
		return;
	}
	/* The slab stays, unchanged (CPU slabs are immutable) and unevicted,
	 * until WRITTEN. */
	e->flags |= F_RWRITING;
	ev->rwriting++;
}

/* Drop e from the REMOTE list (it was promoted or retired). */
static void rl_remove(struct kvrt_evict *ev, struct kvrt_index_entry *e)
{
	if (!(e->flags & F_RLIST))
		return;
	e->flags &= ~(F_RLIST | F_RLOST);
	for (uint32_t i = 0; i < ev->rl_n; i++) {
		if (ev->rl[i] == e) {
			ev->rl[i] = ev->rl[--ev->rl_n];
			return;
		}
	}
}

/* REMOTE entries nobody promoted in time, or whose read failed: retire the
 * unpinned ones. */
static void rl_sweep(struct kvrt_evict *ev)
{
	if (!ev->rl_n)
		return;
	uint64_t now = kvrt_now_ns();
	uint32_t j = 0;
	for (uint32_t i = 0; i < ev->rl_n; i++) {
		struct kvrt_index_entry *e = ev->rl[i];
		bool old = now - e->owner_data > _REMOTE_ENTRY_TTL_NS;
		if (!(e->flags & KVRT_INDEX_F_READING) && ((e->flags & F_RLOST) || old) && retire(ev, e))
			continue;
		ev->rl[j++] = e;
	}
	ev->rl_n = j;
}

static void on_admit(struct kvrt_evict *ev, struct kvrt_msg *m)
{
	struct kvrt_chunk_key key = {.lo = m->arg.u64[0], .hi = m->arg.u64[1]};
	uint32_t slab = (uint32_t)m->arg.u64[2];
	uint32_t n = m->arg32;
	uint64_t bytes = kvrt_chunk_payload_bytes(&ev->cfg.shape, n);
	if (slab >= ev->slabs) {
		kvrt_error("evict: admit of slab %u (pool has %u): ignored", slab, ev->slabs);
		return;
	}
	if (!n || bytes > kvrt_pool_slab_bytes(ev->pool)) {
		kvrt_error("evict: admit of %u tokens (%llu bytes) does not fit a slab: dropped", n,
			   (unsigned long long)bytes);
		kvrt_pool_free(ev->pool, slab);
		INC(ev, admit_failed);
		return;
	}
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	if (e) {
		enum kvrt_tier t = kvrt_index_entry_tier(e);
		if ((t == KVRT_TIER_DISK || t == KVRT_TIER_REMOTE) &&
		    !(e->flags & (KVRT_INDEX_F_READING | F_LOST | F_RLOST)) && e->bytes == bytes) {
			/* The chunk is in a lower tier only: the new copy makes it
			 * CPU-resident. */
			kvrt_index_promote(e, slab);
			kvrt_policy_insert(ev->pol, e);
			if (t == KVRT_TIER_REMOTE) {
				rl_remove(ev, e);
				e->flags |= F_IN_REMOTE; /* still there */
				DEC(ev, remote_entries);
			} else {
				DEC(ev, disk_entries);
			}
			INC(ev, cpu_entries);
			INC(ev, admitted);
			media_sync(ev, e);
		} else {
			kvrt_pool_free(ev->pool, slab);
			INC(ev, admit_dup);
		}
		return;
	}
	e = kvrt_index_entry_new(ev->idx, key, KVRT_TIER_CPU);
	if (!e) {
		kvrt_pool_free(ev->pool, slab);
		INC(ev, admit_failed);
		return;
	}
	e->num_tokens = n;
	e->bytes = bytes;
	e->checksum = m->arg.u64[3];
	atomic_store_explicit(&e->slab, slab, memory_order_relaxed);
	int rc = kvrt_index_insert(ev->idx, e);
	if (rc) {
		kvrt_index_entry_free(ev->idx, e);
		kvrt_pool_free(ev->pool, slab);
		INC(ev, admit_failed);
		return;
	}
	kvrt_policy_insert(ev->pol, e);
	INC(ev, cpu_entries);
	INC(ev, admitted);
	media_sync(ev, e);
	remote_write_behind(ev, e);
}

static void waiters_signal(struct kvrt_evict *ev, struct kvrt_index_entry *e, int status)
{
	struct _waiter **pp = &ev->waiters;
	while (*pp) {
		struct _waiter *w = *pp;
		if (w->e == e) {
			*pp = w->next;
			kvrt_completion_signal(w->c, status);
			free(w);
		} else {
			pp = &w->next;
		}
	}
}

/* Start promoting key (reply on c when CPU-resident, or with the error).
 * false: no slab now but a demotion's write in flight will free one: the
 * caller queues it (starved) and tries again. */
static bool promote_key(struct kvrt_evict *ev, struct kvrt_chunk_key key, struct kvrt_completion *c,
			bool may_starve)
{
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	int rc;
	if (!e || (e->flags & (F_LOST | F_RLOST))) {
		rc = -ENOENT;
		goto done;
	}
	if (kvrt_index_entry_tier(e) == KVRT_TIER_CPU) {
		rc = 0;
		goto done;
	}
	struct _waiter *w = malloc(sizeof(*w));
	if (!w) {
		rc = -ENOMEM;
		goto done;
	}
	if (!(e->flags & KVRT_INDEX_F_READING)) {
		bool remote = kvrt_index_entry_tier(e) == KVRT_TIER_REMOTE;
		if (remote ? !ev->remote : !ev->disk) {
			free(w);
			rc = -ENOENT;
			goto done;
		}
		uint32_t slab = kvrt_pool_alloc(ev->pool);
		if (slab == KVRT_POOL_NO_SLAB) {
			evict_pass(ev, 1);
			slab = kvrt_pool_alloc(ev->pool);
		}
		if (slab == KVRT_POOL_NO_SLAB) {
			free(w);
			if (may_starve && ev->writing)
				return false; /* a victim's disk write frees one soon */
			rc = -ENOBUFS;
			goto done;
		}
		if (remote) {
			rc = kvrt_remote_read(ev->remote, key, kvrt_pool_addr(ev->pool, slab),
					      kvrt_pool_slab_bytes(ev->pool), slab);
			if (rc == 0)
				INC(ev, remote_reads);
		} else {
			rc = kvrt_disk_read(ev->disk, key, kvrt_pool_addr(ev->pool, slab),
					    kvrt_pool_slab_bytes(ev->pool), slab);
		}
		if (rc) {
			kvrt_pool_free(ev->pool, slab);
			free(w);
			goto done;
		}
		e->flags |= KVRT_INDEX_F_READING;
		ev->reading++;
	}
	w->e = e;
	w->c = c;
	w->next = ev->waiters;
	ev->waiters = w;
	return true;
done:
	if (c)
		kvrt_completion_signal(c, rc);
	return true;
}

/* Retry starved promotions in order while slabs come free; fail those
 * waiting too long, or all of them once no write is left to free one. */
static void starved_retry(struct kvrt_evict *ev)
{
	uint64_t now = ev->starved ? kvrt_now_ns() : 0;
	while (ev->starved) {
		struct _starved *q = ev->starved;
		bool late = now - q->since_ns > _STARVED_MAX_NS;
		if (!promote_key(ev, q->key, q->c, !late))
			return; /* still no slab: the rest wait behind it */
		ev->starved = q->next;
		if (!ev->starved)
			ev->starved_tail = &ev->starved;
		free(q);
	}
}

static void on_promote(struct kvrt_evict *ev, struct kvrt_msg *m)
{
	struct kvrt_chunk_key key = {.lo = m->arg.u64[0], .hi = m->arg.u64[1]};
	struct kvrt_completion *c = m->reply;
	/* Behind earlier starved ones (FIFO), else now. */
	if (!ev->starved && promote_key(ev, key, c, true))
		return;
	struct _starved *q = malloc(sizeof(*q));
	if (!q) {
		if (c)
			kvrt_completion_signal(c, -ENOBUFS);
		return;
	}
	*q = (struct _starved){.key = key, .c = c, .since_ns = kvrt_now_ns()};
	*ev->starved_tail = q;
	ev->starved_tail = &q->next;
}

static void on_disk_written(struct kvrt_evict *ev, struct kvrt_chunk_key key, int status)
{
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	if (!e || !(e->flags & KVRT_INDEX_F_WRITING))
		return;
	e->flags &= ~KVRT_INDEX_F_WRITING;
	ev->writing--;
	if (e->flags & F_LOST) {
		/* Discarded while it was written: the copy goes with it. */
		if (status == 0)
			e->flags |= F_ON_DISK;
		return;
	}
	if (status == 0) {
		e->flags |= F_ON_DISK;
		if (kvrt_index_try_demote(e, KVRT_TIER_DISK)) {
			free_slab_of(ev, e);
			DEC(ev, cpu_entries);
			INC(ev, disk_entries);
			INC(ev, demoted);
			media_sync(ev, e);
			return;
		}
		media_sync(ev, e); /* pinned: on disk and still in the CPU tier */
	} else {
		INC(ev, demote_failed);
		if (retire(ev, e)) {
			INC(ev, evicted);
			return;
		}
	}
	/* Pinned while it was written: it stays CPU-resident, as recent. */
	kvrt_policy_insert(ev->pol, e);
}

static void on_disk_read_done(struct kvrt_evict *ev, struct kvrt_chunk_key key, int status,
			      uint32_t slab, uint64_t bytes)
{
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	if (!e || !(e->flags & KVRT_INDEX_F_READING)) {
		kvrt_pool_free(ev->pool, slab);
		return;
	}
	e->flags &= ~KVRT_INDEX_F_READING;
	ev->reading--;
	if (status == 0 && bytes != e->bytes)
		status = -EBADMSG;
	if (status == 0) {
		/* release inside promote: the slab's bytes (written by the disk
		 * actor, ordered to us by the mailbox) are visible to readers
		 * that see tier CPU. */
		kvrt_index_promote(e, slab);
		e->flags &= ~F_LOST;
		kvrt_policy_insert(ev->pol, e);
		DEC(ev, disk_entries);
		INC(ev, cpu_entries);
		INC(ev, promoted);
		media_sync(ev, e);
		waiters_signal(ev, e, 0);
		return;
	}
	kvrt_pool_free(ev->pool, slab);
	INC(ev, promote_failed);
	waiters_signal(ev, e, status);
	if (status == -EAGAIN || status == -ENOMEM || status == -EMSGSIZE)
		return; /* transient or a local limit: the file stays */
	/* The copy is bad or gone: a miss from now on. */
	e->flags &= ~F_ON_DISK;
	if (!retire(ev, e)) {
		lost_add(ev, e);
		media_sync(ev, e);
	}
}

static void on_disk_dropped(struct kvrt_evict *ev, struct kvrt_chunk_key key)
{
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	if (!e)
		return;
	INC(ev, disk_dropped);
	e->flags &= ~F_ON_DISK;
	if (kvrt_index_entry_tier(e) != KVRT_TIER_DISK || (e->flags & KVRT_INDEX_F_READING)) {
		media_sync(ev, e);
		return; /* CPU copy remains, or the read's completion decides */
	}
	if (!retire(ev, e)) {
		lost_add(ev, e);
		media_sync(ev, e);
	}
}

static void on_remote_written(struct kvrt_evict *ev, struct kvrt_chunk_key key, int status)
{
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	if (!e || !(e->flags & F_RWRITING))
		return;
	e->flags &= ~F_RWRITING;
	ev->rwriting--;
	if (status == 0) {
		INC(ev, remote_writes);
		e->flags |= F_IN_REMOTE;
		media_sync(ev, e);
	} else {
		INC(ev, remote_write_failed);
	}
}

static void on_remote_read_done(struct kvrt_evict *ev, struct kvrt_chunk_key key, int status,
				uint32_t slab, uint64_t bytes, uint32_t num_tokens)
{
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	if (!e || !(e->flags & KVRT_INDEX_F_READING) || kvrt_index_entry_tier(e) != KVRT_TIER_REMOTE) {
		kvrt_pool_free(ev->pool, slab);
		return;
	}
	e->flags &= ~KVRT_INDEX_F_READING;
	ev->reading--;
	if (status == 0 && (bytes != e->bytes || num_tokens != e->num_tokens))
		status = -EBADMSG; /* another shape under the same key: never served */
	if (status == 0) {
		/* release inside promote: the slab's bytes (written by the remote
		 * actor, ordered to us by the mailbox) are visible to readers
		 * that see tier CPU. */
		kvrt_index_promote(e, slab);
		rl_remove(ev, e);
		kvrt_policy_insert(ev->pol, e);
		DEC(ev, remote_entries);
		INC(ev, cpu_entries);
		INC(ev, remote_hits);
		e->flags |= F_IN_REMOTE; /* read from there */
		media_sync(ev, e);
		waiters_signal(ev, e, 0);
		return;
	}
	kvrt_pool_free(ev->pool, slab);
	if (status == -ENOENT)
		INC(ev, remote_misses);
	else
		INC(ev, remote_errors);
	INC(ev, promote_failed);
	waiters_signal(ev, e, status);
	/* A miss from now on; retired once unpinned (rl_sweep). */
	e->flags |= F_RLOST;
	if (status == -ENOENT) { /* (an error says nothing of what Redis holds) */
		e->flags |= F_RGONE;
		media_sync(ev, e);
	}
}

/* A find request: ask Redis (EXISTS) about f's keys. */
static void on_remote_find(struct kvrt_evict *ev, struct _rfind *f)
{
	int rc = -ENOENT;
	if (ev->remote)
		rc = kvrt_remote_exists(ev->remote, f->keys, f->n, (uint64_t)(uintptr_t)f);
	if (rc) {
		kvrt_completion_signal(f->c, rc);
		free(f);
	}
}

/* Redis holds f's first `present` keys: index those not indexed yet. */
static void on_remote_exists_done(struct kvrt_evict *ev, struct _rfind *f, int status, uint64_t present)
{
	if (present > f->n)
		present = f->n;
	uint64_t now = kvrt_now_ns();
	uint32_t ok = 0;
	for (; ok < present; ok++) {
		struct kvrt_chunk_key key = f->keys[ok];
		uint32_t ntok = f->last_tokens && ok == f->n - 1 ? f->last_tokens : f->num_tokens;
		struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
		if (e)
			continue; /* indexed meanwhile (saved here, or an earlier find) */
		if (ev->rl_n == ev->rl_cap) {
			uint32_t cap = ev->rl_cap ? 2 * ev->rl_cap : 256;
			struct kvrt_index_entry **l = realloc(ev->rl, cap * sizeof(*l));
			if (!l)
				break;
			ev->rl = l;
			ev->rl_cap = cap;
		}
		e = kvrt_index_entry_new(ev->idx, key, KVRT_TIER_REMOTE);
		if (!e)
			break;
		e->num_tokens = ntok;
		e->bytes = kvrt_chunk_payload_bytes(&ev->cfg.shape, ntok);
		/* The value's own checksum is verified by the tier on read. */
		e->checksum = 0;
		e->flags = F_RLIST;
		e->owner_data = now;
		if (kvrt_index_insert(ev->idx, e)) {
			kvrt_index_entry_free(ev->idx, e);
			break;
		}
		ev->rl[ev->rl_n++] = e;
		INC(ev, remote_found);
		INC(ev, remote_entries);
		media_sync(ev, e);
	}
	INC(ev, remote_finds);
	if (!present) {
		if (status && status != -ENOENT)
			INC(ev, remote_errors);
		else
			INC(ev, remote_find_missed);
	}
	f->c->value[0] = ok;
	/* The entries are published (insert) before the signal: a lookup
	 * woken by it finds and pins them. */
	kvrt_completion_signal(f->c, ok ? 0 : status);
	free(f);
}

static void on_reindex(struct kvrt_evict *ev, struct kvrt_msg *m)
{
	const struct _found *f = m->arg.ptr[0];
	size_t n = (size_t)m->arg.u64[1];
	ev->disk = m->arg.ptr[2];
	for (size_t i = 0; i < n; i++) {
		if (kvrt_index_find(ev->idx, f[i].key))
			continue;
		struct kvrt_index_entry *e = kvrt_index_entry_new(ev->idx, f[i].key, KVRT_TIER_DISK);
		if (!e)
			break;
		e->num_tokens = f[i].num_tokens;
		e->bytes = f[i].payload_len;
		/* The header's checksum covers header and payload; the entry's
		 * is the payload's alone (index.h): unknown here, 0. The disk
		 * read verifies the file's own. */
		e->checksum = 0;
		e->flags = F_ON_DISK;
		if (kvrt_index_insert(ev->idx, e)) {
			kvrt_index_entry_free(ev->idx, e);
			continue;
		}
		INC(ev, disk_found);
		INC(ev, disk_entries);
		media_sync(ev, e);
	}
}

/* Scratch for CLEAR: the live entries, gathered before any is retired
 * (kvrt_index_foreach may not see the set change under it). */
struct _clear_vec {
	struct kvrt_index_entry **v; /* entries */
	size_t n, cap;               /* used, allocated */
	bool oom;                    /* some entry was not gathered */
};

static void clear_gather(struct kvrt_index_entry *e, void *arg)
{
	struct _clear_vec *cv = arg;
	if (cv->n == cv->cap) {
		size_t cap = cv->cap ? 2 * cv->cap : 1024;
		struct kvrt_index_entry **v = realloc(cv->v, cap * sizeof(*v));
		if (!v) {
			cv->oom = true;
			return;
		}
		cv->v = v;
		cv->cap = cap;
	}
	cv->v[cv->n++] = e;
}

/* Retire what is neither pinned nor in flight; value[0] = dropped,
 * value[1] = kept. Entries are only freed after the index's grace period
 * (kvrt_index_reclaim in housekeeping), so they stay readable here after
 * their retirement. */
static int on_clear(struct kvrt_evict *ev, uint64_t *dropped, uint64_t *kept)
{
	lost_sweep(ev); /* F_LOST entries left after it are pinned or being read */
	struct _clear_vec cv = {0};
	kvrt_index_foreach(ev->idx, clear_gather, &cv);
	if (cv.oom) {
		free(cv.v);
		return -ENOMEM;
	}
	uint64_t d = 0, k = 0;
	for (size_t i = 0; i < cv.n; i++) {
		struct kvrt_index_entry *e = cv.v[i];
		/* acquire: a pin seen here is a reader's (the retire CAS below
		 * decides races with pins taken after this load). */
		uint64_t st = atomic_load_explicit(&e->state, memory_order_acquire);
		if (kvrt_index_state_pins(st) ||
		    (e->flags & (KVRT_INDEX_F_WRITING | KVRT_INDEX_F_READING | F_RWRITING | F_LOST))) {
			k++;
			continue;
		}
		bool cpu = kvrt_index_entry_tier(e) == KVRT_TIER_CPU;
		/* A CPU entry not in flight is in the policy (victims of a pass
		 * are put back before its handler ends). */
		if (cpu)
			kvrt_policy_remove(ev->pol, e);
		if (!retire(ev, e)) {
			/* A reader pinned it meanwhile: it stays, as recent. */
			if (cpu)
				kvrt_policy_insert(ev->pol, e);
			k++;
			continue;
		}
		rl_remove(ev, e);
		if (cpu)
			INC(ev, evicted);
		d++;
	}
	free(cv.v);
	*dropped = d;
	*kept = k;
	return 0;
}

/* A load found key's CPU copy corrupt: it leaves the index (and its disk
 * copy with it) now, pinned or not; while a tier still reads its slab it
 * stays until that write ends (lost_sweep). */
static void on_discard(struct kvrt_evict *ev, struct kvrt_chunk_key key)
{
	struct kvrt_index_entry *e = kvrt_index_find(ev->idx, key);
	if (!e || (e->flags & F_LOST) || kvrt_index_entry_tier(e) != KVRT_TIER_CPU)
		return; /* gone, going, or only in a lower tier now */
	lost_add(ev, e); /* first: with no memory to track it, it stays */
	if (!(e->flags & F_LOST))
		return;
	INC(ev, discarded);
	e->flags |= F_DISCARD;
	media_sync(ev, e);
	kvrt_policy_remove(ev->pol, e); /* no-op while a tier writes it */
	lost_sweep(ev);
}

static void housekeeping(struct kvrt_evict *ev)
{
	if (ev->cfg.pin_timeout_ns) {
		uint64_t now = kvrt_now_ns();
		if (now > ev->cfg.pin_timeout_ns) {
			size_t n = kvrt_index_unpin_expired(ev->idx, now - ev->cfg.pin_timeout_ns);
			if (n) {
				kvrt_warn("evict: released %zu pins held past %llu ms (a request never finished?)",
					  n, (unsigned long long)(ev->cfg.pin_timeout_ns / 1000000));
				atomic_fetch_add_explicit(&ev->pins_expired, n, memory_order_relaxed);
			}
		}
	}
	lost_sweep(ev);
	rl_sweep(ev);
	if (ev->starved)
		starved_retry(ev);
	refill(ev);
	kvrt_index_reclaim(ev->idx);
	if (ev->removed > 1024 && ev->removed > kvrt_index_count(ev->idx)) {
		kvrt_index_gc(ev->idx);
		ev->removed = 0;
	}
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	housekeeping(w->data);
}

static void handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct kvrt_evict *ev = kvrt_actor_data(a);
	int status = 0;
	switch (m->type) {
	case KVRT_EVICT_ADMIT:
		on_admit(ev, m);
		break;
	case KVRT_EVICT_RETURN:
		for (uint32_t i = 0; i < m->arg32 && i < 5; i++)
			if (m->arg.u64[i] < ev->slabs)
				kvrt_pool_free(ev->pool, (uint32_t)m->arg.u64[i]);
		break;
	case KVRT_EVICT_PROMOTE:
		on_promote(ev, m);
		return; /* replies itself, maybe later */
	case KVRT_EVICT_RUN:
		housekeeping(ev);
		evict_pass(ev, 0);
		break;
	case KVRT_EVICT_SYNC:
		break;
	case KVRT_EVICT_ROOM: {
		if (ev->cfg.on_room)
			ev->cfg.on_room(ev->cfg.hook_ctx);
		struct kvrt_pool_stats st;
		kvrt_pool_stats(ev->pool, &st);
		if (st.free + st.ring < m->arg32)
			evict_pass(ev, m->arg32 - st.free - st.ring);
		kvrt_pool_refill(ev->pool, 0);
		break;
	}
	case KVRT_EVICT_DISCARD:
		if (ev->cfg.debug_discard_delay_ms) /* test instrumentation */
			nanosleep(&(struct timespec){ev->cfg.debug_discard_delay_ms / 1000,
						     (long)(ev->cfg.debug_discard_delay_ms % 1000) *
							     1000000L},
				  NULL);
		on_discard(ev, (struct kvrt_chunk_key){.lo = m->arg.u64[0], .hi = m->arg.u64[1]});
		break;
	case KVRT_EVICT_CLEAR: {
		uint64_t d = 0, k = 0;
		status = on_clear(ev, &d, &k);
		if (m->reply) {
			m->reply->value[0] = d;
			m->reply->value[1] = k;
		}
		break;
	}
	case _MSG_REINDEX:
		on_reindex(ev, m);
		break;
	case _MSG_DETACH:
		ev->disk = NULL;
		break;
	case _MSG_ATTACH_REMOTE:
		ev->remote = m->arg.ptr[0];
		break;
	case _MSG_DETACH_REMOTE:
		ev->remote = NULL;
		break;
	case KVRT_EVICT_REMOTE_FIND:
		on_remote_find(ev, m->arg.ptr[0]);
		break;
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_WRITTEN:
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_READ_DONE:
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_EXISTS_DONE:
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_REMOVED: {
		struct kvrt_chunk_key key = {.lo = m->arg.u64[0], .hi = m->arg.u64[1]};
		int st = (int)m->arg.i64[2];
		if (m->type == KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_WRITTEN)
			on_remote_written(ev, key, st);
		else if (m->type == KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_READ_DONE)
			on_remote_read_done(ev, key, st, (uint32_t)m->arg.u64[3], m->arg.u64[4], m->arg32);
		else if (m->type == KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_EXISTS_DONE)
			on_remote_exists_done(ev, (struct _rfind *)(uintptr_t)m->arg.u64[3], st,
					      m->arg.u64[4]);
		break;
	}
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_WRITTEN:
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_READ_DONE:
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_REMOVED:
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_DROPPED: {
		struct kvrt_chunk_key key = {.lo = m->arg.u64[0], .hi = m->arg.u64[1]};
		int st = (int)m->arg.i64[2];
		if (m->type == KVRT_EVICT_DISK_BASE + KVRT_DISK_WRITTEN)
			on_disk_written(ev, key, st);
		else if (m->type == KVRT_EVICT_DISK_BASE + KVRT_DISK_READ_DONE)
			on_disk_read_done(ev, key, st, (uint32_t)m->arg.u64[3], m->arg.u64[4]);
		else if (m->type == KVRT_EVICT_DISK_BASE + KVRT_DISK_DROPPED)
			on_disk_dropped(ev, key);
		break;
	}
	default:
		kvrt_error("evict: unknown message type %u", m->type);
		status = -EINVAL;
		break;
	}
	if (ev->starved) /* a write's end, a return, an eviction may have freed a slab */
		starved_retry(ev);
	refill(ev);
	if (m->reply)
		kvrt_completion_signal(m->reply, status);
}

static int start(struct kvrt_actor *a)
{
	struct kvrt_evict *ev = kvrt_actor_data(a);
	ev_timer_init(&ev->tick, tick_cb, (double)ev->cfg.tick_ns / 1e9, (double)ev->cfg.tick_ns / 1e9);
	ev->tick.data = ev;
	ev_timer_start(kvrt_actor_loop(a), &ev->tick);
	kvrt_pool_refill(ev->pool, 0);
	return 0;
}

static void stop(struct kvrt_actor *a)
{
	struct kvrt_evict *ev = kvrt_actor_data(a);
	ev_timer_stop(kvrt_actor_loop(a), &ev->tick);
	/* Promotions still waiting (the disk closed under them) fail. */
	while (ev->starved) {
		struct _starved *q = ev->starved;
		ev->starved = q->next;
		if (q->c)
			kvrt_completion_signal(q->c, -ESHUTDOWN);
		free(q);
	}
	ev->starved_tail = &ev->starved;
	while (ev->waiters) {
		struct _waiter *w = ev->waiters;
		ev->waiters = w->next;
		kvrt_completion_signal(w->c, -ESHUTDOWN);
		free(w);
	}
	kvrt_index_barrier(ev->idx);
}

static const char *msg_name(uint32_t type)
{
	switch (type) {
	case KVRT_EVICT_ADMIT: return "admit";
	case KVRT_EVICT_RETURN: return "return";
	case KVRT_EVICT_PROMOTE: return "promote";
	case KVRT_EVICT_RUN: return "run";
	case KVRT_EVICT_SYNC: return "sync";
	case KVRT_EVICT_CLEAR: return "clear";
	case KVRT_EVICT_DISCARD: return "discard";
	case KVRT_EVICT_ROOM: return "room";
	case _MSG_REINDEX: return "reindex";
	case _MSG_DETACH: return "detach";
	case _MSG_ATTACH_REMOTE: return "attach_remote";
	case _MSG_DETACH_REMOTE: return "detach_remote";
	case KVRT_EVICT_REMOTE_FIND: return "remote_find";
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_WRITTEN: return "remote_written";
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_READ_DONE: return "remote_read_done";
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_EXISTS_DONE: return "remote_exists_done";
	case KVRT_EVICT_REMOTE_BASE + KVRT_REMOTE_REMOVED: return "remote_removed";
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_WRITTEN: return "disk_written";
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_READ_DONE: return "disk_read_done";
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_REMOVED: return "disk_removed";
	case KVRT_EVICT_DISK_BASE + KVRT_DISK_DROPPED: return "disk_dropped";
	default: return "?";
	}
}

static const struct kvrt_actor_ops evict_ops = {
	.handle = handle,
	.start = start,
	.stop = stop,
	.msg_name = msg_name,
};

/* ===================== owner / any thread ============================== */

static void found_cb(void *ctx, const struct kvrt_chunk_header *h)
{
	struct _found_vec *fv = ctx;
	if (fv->n == fv->cap) {
		size_t cap = fv->cap ? 2 * fv->cap : 1024;
		struct _found *v = realloc(fv->v, cap * sizeof(*v));
		if (!v) {
			fv->oom = true;
			return;
		}
		fv->v = v;
		fv->cap = cap;
	}
	fv->v[fv->n++] = (struct _found){.key = h->key, .payload_len = h->payload_len,
					 .checksum = h->checksum, .num_tokens = h->num_tokens};
}

static int call(struct kvrt_evict *ev, struct kvrt_msg *m)
{
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	return kvrt_actor_call(ev->actor, m, &c, 5000000000ull);
}

int kvrt_evict_create(struct kvrt_evict **out, const struct kvrt_evict_config *cfg)
{
	*out = NULL;
	if (!cfg || !cfg->index || !cfg->pool || !cfg->shape.num_layers || !cfg->shape.token_bytes)
		return -EINVAL;
	struct kvrt_evict *ev = calloc(1, sizeof(*ev));
	if (ev)
		ev->starved_tail = &ev->starved;
	if (!ev)
		return -ENOMEM;
	int rc = -ENOMEM;
	ev->cfg = *cfg;
	ev->idx = cfg->index;
	ev->pool = cfg->pool;
	ev->slabs = kvrt_pool_slabs(cfg->pool);
	double hi = cfg->high_watermark > 0 ? cfg->high_watermark : 0.95;
	double lo = cfg->low_watermark > 0 ? cfg->low_watermark : 0.85;
	if (hi > 1 || lo > hi) {
		kvrt_error("evict: watermarks need 0 < low (%g) <= high (%g) <= 1", lo, hi);
		rc = -EINVAL;
		goto err;
	}
	ev->high = (uint32_t)(hi * ev->slabs);
	ev->low = (uint32_t)(lo * ev->slabs);
	if (!ev->cfg.tick_ns)
		ev->cfg.tick_ns = 10000000;
	if (!ev->cfg.mailbox_size)
		ev->cfg.mailbox_size = 4096;
	bool want_disk = cfg->disk_dir && cfg->disk_dir[0] && cfg->disk_budget_bytes;
	if (want_disk && !(ev->dir = strdup(cfg->disk_dir)))
		goto err;
	ev->cfg.disk_dir = ev->dir;
	bool want_remote = cfg->remote_url && cfg->remote_url[0];
	if (want_remote && !(ev->url = strdup(cfg->remote_url)))
		goto err;
	ev->cfg.remote_url = ev->url;
	ev->skip = calloc(ev->slabs, sizeof(*ev->skip));
	if (!ev->skip)
		goto err;
	if (cfg->tier_events && (rc = kvrt_tier_events_create(&ev->te, cfg->tier_events)))
		goto err;
	rc = kvrt_policy_create(&ev->pol, cfg->policy, ev->slabs);
	if (rc)
		goto err;
	rc = kvrt_actor_create(&ev->actor, &(struct kvrt_actor_config){.name = "evict",
								     .mailbox_size = ev->cfg.mailbox_size,
								     .ops = &evict_ops,
								     .data = ev});
	if (rc)
		goto err;
	if (want_disk) {
		struct _found_vec fv = {0};
		rc = kvrt_disk_open(&ev->disk_owner,
				    &(struct kvrt_disk_config){.dir = ev->dir,
							       .budget_bytes = cfg->disk_budget_bytes,
							       .namespace_hash = cfg->namespace_hash,
							       .notify = ev->actor,
							       .msg_base = KVRT_EVICT_DISK_BASE,
							       .on_found = found_cb,
							       .ctx = &fv,
							       .use_odirect = cfg->disk_odirect});
		if (rc) {
			free(fv.v);
			goto err_actor;
		}
		if (fv.oom)
			kvrt_warn("evict: out of memory re-indexing %s: some chunks on disk stay unused", ev->dir);
		struct kvrt_msg m = {.type = _MSG_REINDEX};
		m.arg.ptr[0] = fv.v;
		m.arg.u64[1] = fv.n;
		m.arg.ptr[2] = ev->disk_owner;
		rc = call(ev, &m);
		free(fv.v);
		if (rc)
			goto err_disk;
	}
	if (want_remote) {
		/* Owner thread (the tier's rule); completions go to the actor. */
		rc = kvrt_remote_open(&ev->remote_owner,
				      &(struct kvrt_remote_config){.url = ev->url,
								   .timeout_ms = cfg->remote_timeout_ms,
								   .ttl_s = cfg->remote_ttl_s,
								   .max_pending_writes = cfg->remote_max_pending_writes,
								   .namespace_hash = cfg->namespace_hash,
								   .notify = ev->actor,
								   .msg_base = KVRT_EVICT_REMOTE_BASE});
		if (rc)
			goto err_disk;
		struct kvrt_msg m = {.type = _MSG_ATTACH_REMOTE};
		m.arg.ptr[0] = ev->remote_owner;
		if ((rc = call(ev, &m)))
			goto err_remote;
	}
	*out = ev;
	return 0;
err_remote:
	kvrt_remote_close(ev->remote_owner);
err_disk:
	kvrt_disk_close(ev->disk_owner);
err_actor:
	kvrt_actor_destroy(ev->actor);
err:
	kvrt_policy_destroy(ev->pol);
	kvrt_tier_events_destroy(ev->te);
	free(ev->skip);
	free(ev->dir);
	free(ev->url);
	free(ev);
	return rc;
}

struct kvrt_tier_events *kvrt_evict_tier_events(struct kvrt_evict *ev)
{
	return ev ? ev->te : NULL;
}

void kvrt_evict_destroy(struct kvrt_evict *ev)
{
	if (!ev)
		return;
	if (ev->remote_owner) {
		struct kvrt_msg m = {.type = _MSG_DETACH_REMOTE};
		if (call(ev, &m))
			kvrt_error("evict: could not detach the remote tier before closing it");
		/* The actor handles the completions close delivers (write-behinds
		 * end, reads in flight give their slabs back). */
		kvrt_remote_close(ev->remote_owner);
	}
	if (ev->disk_owner) {
		struct kvrt_msg m = {.type = _MSG_DETACH};
		if (call(ev, &m))
			kvrt_error("evict: could not detach the disk tier before closing it");
		/* The actor keeps handling the completions close delivers. */
		kvrt_disk_close(ev->disk_owner);
	}
	kvrt_actor_destroy(ev->actor);
	/* Detached entries are out of the index: theirs to free (their pins'
	 * owners are gone with the requests; the index never reads them). */
	for (uint32_t i = 0; i < ev->lost_n; i++)
		if (ev->lost[i]->flags & F_DETACHED)
			kvrt_index_entry_free(ev->idx, ev->lost[i]);
	kvrt_policy_destroy(ev->pol);
	kvrt_tier_events_destroy(ev->te);
	free(ev->skip);
	free(ev->lost);
	free(ev->rl);
	free(ev->dir);
	free(ev->url);
	free(ev);
}

int kvrt_evict_admit(struct kvrt_evict *ev, struct kvrt_chunk_key key, uint32_t slab,
		     uint32_t num_tokens, uint64_t checksum)
{
	struct kvrt_msg m = {.type = KVRT_EVICT_ADMIT, .arg32 = num_tokens};
	m.arg.u64[0] = key.lo;
	m.arg.u64[1] = key.hi;
	m.arg.u64[2] = slab;
	m.arg.u64[3] = checksum;
	return kvrt_actor_try_post(ev->actor, &m) ? 0 : -EAGAIN;
}

int kvrt_evict_return_slabs(struct kvrt_evict *ev, const uint32_t *slabs, uint32_t n)
{
	if (n > 5)
		return -EINVAL;
	struct kvrt_msg m = {.type = KVRT_EVICT_RETURN, .arg32 = n};
	for (uint32_t i = 0; i < n; i++)
		m.arg.u64[i] = slabs[i];
	return kvrt_actor_try_post(ev->actor, &m) ? 0 : -EAGAIN;
}

int kvrt_evict_promote(struct kvrt_evict *ev, struct kvrt_chunk_key key, struct kvrt_completion *c)
{
	struct kvrt_msg m = {.type = KVRT_EVICT_PROMOTE, .reply = c};
	m.arg.u64[0] = key.lo;
	m.arg.u64[1] = key.hi;
	return kvrt_actor_post(ev->actor, &m, 0);
}

int kvrt_evict_remote_find(struct kvrt_evict *ev, const struct kvrt_chunk_key *keys, uint32_t n,
			   uint32_t num_tokens, uint32_t last_tokens, struct kvrt_completion *c)
{
	if (!n || n > KVRT_REMOTE_EXISTS_MAX)
		return -EINVAL;
	if (!ev->remote_owner) {
		kvrt_completion_signal(c, -ENOENT);
		return 0;
	}
	struct _rfind *f = malloc(sizeof(*f) + n * sizeof(f->keys[0]));
	if (!f)
		return -ENOMEM;
	*f = (struct _rfind){.c = c, .n = n, .num_tokens = num_tokens, .last_tokens = last_tokens};
	memcpy(f->keys, keys, n * sizeof(*keys));
	struct kvrt_msg m = {.type = KVRT_EVICT_REMOTE_FIND};
	m.arg.ptr[0] = f;
	if (!kvrt_actor_try_post(ev->actor, &m)) {
		free(f);
		return -EAGAIN;
	}
	return 0;
}

int kvrt_evict_discard(struct kvrt_evict *ev, struct kvrt_chunk_key key)
{
	struct kvrt_msg m = {.type = KVRT_EVICT_DISCARD};
	m.arg.u64[0] = key.lo;
	m.arg.u64[1] = key.hi;
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	return kvrt_actor_call(ev->actor, &m, &c, 1000000000ull);
}

int kvrt_evict_clear(struct kvrt_evict *ev, uint64_t *dropped, uint64_t *kept)
{
	struct kvrt_msg m = {.type = KVRT_EVICT_CLEAR};
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	int rc = kvrt_actor_call(ev->actor, &m, &c, 5000000000ull);
	if (dropped)
		*dropped = rc ? 0 : c.value[0];
	if (kept)
		*kept = rc ? 0 : c.value[1];
	return rc;
}

bool kvrt_evict_has_remote(const struct kvrt_evict *ev)
{
	return ev->remote_owner != NULL;
}

int kvrt_evict_run(struct kvrt_evict *ev)
{
	struct kvrt_msg m = {.type = KVRT_EVICT_RUN};
	return call(ev, &m);
}

int kvrt_evict_ask_room(struct kvrt_evict *ev, uint32_t n, struct kvrt_completion *c)
{
	kvrt_completion_init(c);
	struct kvrt_msg m = {.type = KVRT_EVICT_ROOM, .arg32 = n, .reply = c};
	return kvrt_actor_post(ev->actor, &m, 1000000ull);
}

int kvrt_evict_sync(struct kvrt_evict *ev)
{
	struct kvrt_msg m = {.type = KVRT_EVICT_SYNC};
	return call(ev, &m);
}

void kvrt_evict_stats(struct kvrt_evict *ev, struct kvrt_evict_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->admitted = GET(ev, admitted);
	out->admit_dup = GET(ev, admit_dup);
	out->admit_failed = GET(ev, admit_failed);
	out->evicted = GET(ev, evicted);
	out->demoted = GET(ev, demoted);
	out->demote_failed = GET(ev, demote_failed);
	out->demote_skipped = GET(ev, demote_skipped);
	out->evict_blocked = GET(ev, evict_blocked);
	out->promoted = GET(ev, promoted);
	out->promote_failed = GET(ev, promote_failed);
	out->disk_dropped = GET(ev, disk_dropped);
	out->disk_found = GET(ev, disk_found);
	out->pins_expired = GET(ev, pins_expired);
	out->cpu_entries = GET(ev, cpu_entries);
	out->disk_entries = GET(ev, disk_entries);
	out->remote_writes = GET(ev, remote_writes);
	out->remote_write_dropped = GET(ev, remote_write_dropped);
	out->remote_write_failed = GET(ev, remote_write_failed);
	out->remote_finds = GET(ev, remote_finds);
	out->remote_found = GET(ev, remote_found);
	out->remote_find_missed = GET(ev, remote_find_missed);
	out->remote_reads = GET(ev, remote_reads);
	out->remote_hits = GET(ev, remote_hits);
	out->remote_misses = GET(ev, remote_misses);
	out->remote_errors = GET(ev, remote_errors);
	out->remote_entries = GET(ev, remote_entries);
	out->discarded = GET(ev, discarded);
	struct kvrt_pool_stats ps;
	kvrt_pool_stats(ev->pool, &ps);
	out->slabs = ps.slabs;
	out->slabs_free = ps.free + ps.ring;
}

struct kvrt_actor *kvrt_evict_actor(struct kvrt_evict *ev)
{
	return ev->actor;
}
