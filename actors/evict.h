/* actors/evict.h: the evict actor, single writer of the chunk index.
 *
 * Owns: every write to the index (actors/index.h), the pool's free list and
 * the refill of its hand-off ring (actors/pool.h), the CPU tier's eviction
 * policy (actors/policy.h), and, when configured, the local disk tier
 * (actors/disk.h): it opens it at create (owner thread), demotes evicted chunks to
 * it and promotes chunks back from it; and, when remote_url is set, the
 * remote tier (actors/remote.h, Redis / Redis Cluster) shared by every
 * engine pointed at it.
 *
 *   kvrt_index_create(&idx, ...); kvrt_pool_create(&pool, ...);
 *   kvrt_evict_create(&ev, &(struct kvrt_evict_config){ .index = idx, .pool = pool,
 *           .shape = shape, .namespace_hash = ns, .policy = KVRT_POLICY_LRU,
 *           .disk_dir = "/mnt/nvme/kvrt", .disk_budget_bytes = 100ull << 30 });
 *   // save actor: take a slab, fill it, hand it over
 *   uint32_t slab; if (kvrt_pool_take(pool, &slab)) { ...; kvrt_evict_admit(ev, key, slab, n, sum); }
 *   // lookup: kvrt_index_lookup(reader, keys, n, req, KVRT_INDEX_PIN | KVRT_INDEX_TOUCH, hits)
 *   // load of a DISK hit: kvrt_evict_promote(ev, key, &completion) then wait on it
 *   kvrt_evict_destroy(ev);   // then destroy pool and index
 *
 * Eviction: the occupancy is the share of slabs not free (held by entries,
 * by producers, or by reads in flight). Above high_watermark the actor
 * evicts victims of the policy until it is at or below low_watermark:
 * pinned entries and entries in flight (being written to or read from disk)
 * are skipped, never evicted. With a disk tier a victim is first written to
 * disk (its slab kept until WRITTEN), then its entry moves to tier DISK;
 * without one (or when the disk refuses) the entry is retired. It runs after
 * every admit, on a timer (tick_ns) and on request; it never waits.
 *
 * Back-pressure: a producer that finds the ring empty asks for room
 * (kvrt_evict_make_room: the save actor does, off the forward's path) and
 * skips its save when there is still none (pins hold the pool); admit is a try-post and fails with -EAGAIN when
 * the mailbox is full (the caller then returns the slab with
 * kvrt_evict_return_slab later, or keeps it for the next chunk). A promote
 * with no free slab after an eviction pass fails with -ENOBUFS.
 *
 * Remote tier (remote_url set). Write-behind: every chunk admitted as new is
 * written to Redis in the background (kvrt_remote_write straight from its
 * slab; the entry is marked in flight, never evicted, until WRITTEN). The
 * tier bounds the writes in flight (remote_max_pending_writes): a write it
 * refuses (-EAGAIN full, -ENOTCONN down) is dropped and counted, nothing
 * waits. Reads: kvrt_evict_remote_find asks Redis which leading chunks of a
 * key list it holds (one pipelined EXISTS) and indexes them as tier REMOTE
 * entries (no slab); kvrt_evict_promote of such an entry reads it into a
 * fresh slab (verified by the tier: header, key, namespace, checksum) and
 * makes it CPU-resident, exactly as for a disk chunk; a failed read makes it
 * a miss (the promotion's waiters get the error: loads turn it into load
 * errors). REMOTE entries nobody promoted are dropped when unpinned and
 * older than 2 s (a later lookup asks Redis again). Chunks promoted from
 * Redis are not written back.
 *
 * Threads: create/destroy on an owner thread; the posting functions from any
 * thread but the actor's own; stats from any thread.
 */
#ifndef KVRT_ACTORS_EVICT_H
#define KVRT_ACTORS_EVICT_H

#include "actors/chunk.h"
#include "actors/index.h"
#include "actors/policy.h"
#include "actors/pool.h"
#include "actors/tier_events.h"
#include "runtime/actor.h"

struct kvrt_evict;

struct kvrt_evict_config {
	struct kvrt_index *index;      /* the index; the actor is its only writer */
	struct kvrt_pool *pool;        /* the CPU pool; the actor owns its free list */
	struct kvrt_chunk_shape shape; /* every chunk's shape (disk headers) */
	uint64_t namespace_hash;       /* seed of the keys (disk headers, foreign files) */
	enum kvrt_policy_kind policy;  /* cache_policy: LRU (default) or S3FIFO */
	double high_watermark;         /* evict above this share of slabs; 0 = 0.95 */
	double low_watermark;          /* ... down to this share; 0 = 0.85 */
	uint64_t tick_ns;              /* housekeeping period; 0 = 10 ms */
	uint64_t pin_timeout_ns;       /* pins older than this are released; 0 = never */
	uint32_t mailbox_size;         /* power of two; 0 = 4096 */
	/* Local disk tier (optional: disk_dir NULL or budget 0 = none). */
	const char *disk_dir;          /* local_disk directory */
	uint64_t disk_budget_bytes;    /* max_local_disk_size in bytes */
	bool disk_odirect;             /* O_DIRECT for the disk tier */
	/* Remote tier (optional: remote_url NULL or "" = none). */
	const char *remote_url;        /* redis://... or redis-cluster://... (copied) */
	uint32_t remote_timeout_ms;    /* per-request deadline; 0 = 1000 */
	uint32_t remote_ttl_s;         /* expiry of written values; 0 = none */
	uint32_t remote_max_pending_writes; /* write-behind queue bound; 0 = 16 */
	/* Test instrumentation: called on the actor's thread before a room
	 * request is served (a test makes the actor slow). NULL: none. */
	void (*on_room)(void *ctx);
	void *hook_ctx;
	/* Test instrumentation: the actor sleeps this long before it handles
	 * a discard (kvrt_evict_discard's caller must not outrun it). 0: none. */
	uint32_t debug_discard_delay_ms;
	/* Tier events (actors/tier_events.h): ring entries; 0 = none (no
	 * cost). The actor pushes a STORED or REMOVED for each medium a chunk
	 * becomes loadable from or stops being. */
	uint32_t tier_events;
};

struct kvrt_evict_stats {
	uint64_t admitted;        /* chunks admitted to the CPU tier */
	uint64_t admit_dup;       /* admits of a key already present (slab freed) */
	uint64_t admit_failed;    /* admits refused for memory (slab freed) */
	uint64_t evicted;         /* entries retired from the CPU tier */
	uint64_t demoted;         /* entries moved CPU -> DISK */
	uint64_t demote_failed;   /* disk writes that failed (entry retired) */
	uint64_t demote_skipped;  /* victims retired because the disk refused a write */
	uint64_t evict_blocked;   /* passes that stopped above low: all pinned/in flight */
	uint64_t promoted;        /* DISK -> CPU reads completed */
	uint64_t promote_failed;  /* promotions that failed (chunk now a miss) */
	uint64_t disk_dropped;    /* DISK entries the disk tier forgot */
	uint64_t disk_found;      /* chunks re-indexed from disk at start */
	uint64_t pins_expired;    /* pins released by the time-out */
	uint64_t cpu_entries;     /* entries resident in the CPU tier */
	uint64_t disk_entries;    /* entries in the disk tier only */
	uint64_t remote_writes;   /* write-behinds stored in Redis */
	uint64_t remote_write_dropped; /* write-behinds refused (queue full, server down) */
	uint64_t remote_write_failed;  /* write-behinds that failed in flight */
	uint64_t remote_finds;    /* find batches answered by Redis */
	uint64_t remote_found;    /* chunks indexed from Redis (tier REMOTE) */
	uint64_t remote_find_missed; /* find batches whose first key Redis lacked */
	uint64_t remote_reads;    /* reads from Redis started (promotions) */
	uint64_t remote_hits;     /* reads that brought a chunk into the CPU tier */
	uint64_t remote_misses;   /* reads of chunks no longer in Redis */
	uint64_t remote_errors;   /* reads / finds that failed otherwise (corrupt,
				   * timeout, connection) */
	uint64_t remote_entries;  /* REMOTE entries indexed now */
	uint64_t discarded;       /* CPU chunks dropped because a load found them corrupt */
	uint32_t slabs;           /* pool slabs */
	uint32_t slabs_free;      /* on the free list or in the ring */
};

/* Message types (for the tracer); the functions below post them. */
enum kvrt_evict_msg {
	KVRT_EVICT_ADMIT = 1,   /* key, slab, num_tokens, checksum */
	KVRT_EVICT_RETURN,      /* slabs given back unused */
	KVRT_EVICT_PROMOTE,     /* read a DISK chunk into a slab; reply when CPU */
	KVRT_EVICT_RUN,         /* run an eviction pass now; reply when done */
	KVRT_EVICT_SYNC,        /* reply once everything posted before is handled */
	KVRT_EVICT_REMOTE_FIND, /* EXISTS a key list in Redis; index what it holds */
	KVRT_EVICT_CLEAR,       /* retire every entry not pinned nor in flight */
	KVRT_EVICT_ROOM,        /* free n slabs (evicting) into the ring; reply */
	KVRT_EVICT_DISCARD,     /* a reader found a CPU chunk corrupt: drop it */
	KVRT_EVICT_DISK_BASE = 64, /* + enum kvrt_disk_event (disk completions) */
	KVRT_EVICT_REMOTE_BASE = 80, /* + enum kvrt_remote_event (remote completions) */
};

/* Start the actor (opens the disk tier, re-indexing what it holds, before
 * this returns). Owner thread. 0, -EINVAL, -ENOMEM, or the disk's error. */
int kvrt_evict_create(struct kvrt_evict **out, const struct kvrt_evict_config *cfg);
/* Stop: finish accepted messages, wait for disk writes in flight, close the
 * disk tier, free the policy. Index entries stay (destroy the index after).
 * NULL ok. */
void kvrt_evict_destroy(struct kvrt_evict *ev);

/* Hand a filled slab over as key's chunk of num_tokens tokens. Any thread;
 * never blocks. 0 (the slab now belongs to the actor: on a duplicate key or
 * no memory it frees it), -EAGAIN (mailbox full: the slab is still the
 * caller's). */
int kvrt_evict_admit(struct kvrt_evict *ev, struct kvrt_chunk_key key, uint32_t slab,
		     uint32_t num_tokens, uint64_t checksum);
/* Give back up to 5 slabs taken with kvrt_pool_take and not used.
 * 0 or -EAGAIN (the slabs are still the caller's). Any thread. */
int kvrt_evict_return_slabs(struct kvrt_evict *ev, const uint32_t *slabs, uint32_t n);
/* Ask for key's chunk in the CPU tier. c (caller-owned, initialised) is
 * signalled with 0 once it is (at once if it already is), or -ENOENT (not
 * indexed), -ENOBUFS (no slab), -EAGAIN (disk busy), -EBADMSG / -EIO (the
 * read failed: the chunk is removed, a miss from now on). The caller should
 * hold a pin on it (kvrt_index_lookup), or it may be evicted again right
 * after. Returns the post's error (0, -EAGAIN, -ESHUTDOWN). Any thread. */
int kvrt_evict_promote(struct kvrt_evict *ev, struct kvrt_chunk_key key, struct kvrt_completion *c);
/* Ask Redis which leading chunks of keys[0..n) it holds (n <= 4096; keys
 * copied) and index those not indexed yet as tier REMOTE entries of
 * num_tokens tokens each (the last one of last_tokens when last_tokens != 0:
 * a tail). c (caller-owned, initialised, alive until signalled) is
 * signalled with status 0 and value[0] = the leading chunks Redis holds
 * (each now indexed: pin them with kvrt_index_lookup), or -ENOENT (no
 * remote tier), or the tier's error (a miss). Returns the post's error
 * (0, -EAGAIN, -ESHUTDOWN). Any thread. */
int kvrt_evict_remote_find(struct kvrt_evict *ev, const struct kvrt_chunk_key *keys, uint32_t n,
			   uint32_t num_tokens, uint32_t last_tokens, struct kvrt_completion *c);
/* Retire every index entry that is neither pinned nor in flight (a disk
 * write, a Redis write-behind or a promotion running): CPU entries free
 * their slab, entries with a disk copy remove it (kvrt_disk_remove), REMOTE
 * entries are only forgotten here (the shared Redis data stays, and chunks
 * in Redis stay reachable to later lookups). Waits for the actor (5 s post
 * deadline). *dropped / *kept (either may be NULL): entries retired / left
 * because pinned or in flight. 0, -ENOMEM, or the post's error (-ETIMEDOUT,
 * -ESHUTDOWN). Any thread but the actor's own. */
int kvrt_evict_clear(struct kvrt_evict *ev, uint64_t *dropped, uint64_t *kept);
/* A reader found the CPU copy of key corrupt (its checksum failed on load):
 * the chunk leaves the index and the disk tier at once, or as soon as the
 * copies in flight on it are gone (a later lookup may still be promised it
 * until then; its load fails the checksum again and is recomputed). Waits
 * until the actor has handled it, so a save the caller's report leads to
 * (vLLM recomputes the chunk and saves it) never finds the corrupt copy
 * still indexed and skips itself as a duplicate: the next save of key
 * admits a fresh copy. Any thread but the actor's. 0, or the post's error
 * (-ETIMEDOUT after 1 s of a full mailbox, -ESHUTDOWN): the chunk then
 * fails its checksum again on a later load, which asks again. */
int kvrt_evict_discard(struct kvrt_evict *ev, struct kvrt_chunk_key key);
/* The tier-event ring (cfg.tier_events), or NULL: its one consumer takes
 * from it (kvrt_tier_events_take). Any thread. */
struct kvrt_tier_events *kvrt_evict_tier_events(struct kvrt_evict *ev);
/* Whether a remote tier is configured. */
bool kvrt_evict_has_remote(const struct kvrt_evict *ev);
/* Run an eviction pass and wait for it (tests, after releasing pins). */
int kvrt_evict_run(struct kvrt_evict *ev);
/* A producer found the pool's hand-off ring empty: ask for n slabs free,
 * evicting the policy's victims when the free list holds fewer (below the
 * watermarks if need be: new chunks push old ones out), and the ring
 * refilled. Does not wait: c (initialized here) is signalled when done;
 * the caller may wait on it as long as it likes but must not reuse or free
 * it before kvrt_completion_done(c). The save actor asks, off the
 * forward's path. 0 or the post's error (-ETIMEDOUT, -ESHUTDOWN; then c is
 * never signalled). Any thread but the actor's own. */
int kvrt_evict_ask_room(struct kvrt_evict *ev, uint32_t n, struct kvrt_completion *c);
/* Wait until everything posted before (by this thread) is handled. */
int kvrt_evict_sync(struct kvrt_evict *ev);
/* Counters (any thread, racy snapshot). */
void kvrt_evict_stats(struct kvrt_evict *ev, struct kvrt_evict_stats *out);
/* The actor, for tracing and stats. */
struct kvrt_actor *kvrt_evict_actor(struct kvrt_evict *ev);

#endif
