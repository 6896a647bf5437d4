/* actors/index.c: see index.h (ownership, threads, memory ordering). */
#include "actors/index.h"

#include <ck_hs.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"

/* Owner table shards: pins of one owner live in one shard under its mutex.
 * Pin/unpin take it once per lookup or release (per request, not per token). */
#define OWNER_SHARDS 64u

/* A pin owner (a request): the entries it pinned, one slot per pin. */
struct _owner {
	uint64_t id;                    /* owner id */
	uint64_t since_ns;              /* time of its first pin (time-outs) */
	uint32_t n;                     /* pins held */
	uint32_t cap;                   /* slots in e */
	struct kvrt_index_entry **e;    /* pinned entries */
	struct _owner *next;            /* shard list */
};

struct _shard {
	pthread_mutex_t lock; /* guards head and every owner on the list */
	struct _owner *head;  /* owners of this shard */
} KVRT_CL_ALIGNED;

/* A reader: its epoch record first (ck_epoch_recycle hands records back). */
struct kvrt_index_reader {
	ck_epoch_record_t rec;          /* this reader's epoch record */
	struct kvrt_index *idx;         /* owner index */
	struct kvrt_index_reader *all;  /* every reader ever allocated (freed at destroy) */
};

struct kvrt_index {
	ck_hs_t hs;                       /* key -> entry, SPMC */
	ck_epoch_t epoch;                 /* reclamation domain */
	ck_epoch_record_t wrec;           /* the writer's record */
	_Atomic uint64_t clock KVRT_CL_ALIGNED; /* access stamps (readers fetch_add) */
	_Atomic uint64_t pinned KVRT_CL_ALIGNED; /* pins held, all owners */
	_Atomic uint64_t owners;          /* owners holding pins */
	uint64_t pending;                 /* retired, not yet freed (writer) */
	pthread_mutex_t readers_lock;     /* guards readers */
	struct kvrt_index_reader *readers; /* allocated reader records */
	int tsan_sync;                    /* address TSan uses for the epoch hand-off */
	struct _shard shards[OWNER_SHARDS];
};

/* The index whose writer is inside a ck_hs call on this thread: ck_malloc's
 * free callback has no context argument, and a map ck_hs frees with defer
 * set must go through that index's epoch. */
static _Thread_local struct kvrt_index *_writer_idx;

/* ck_hs maps are allocated with this header so a deferred free can queue
 * them on the epoch. */
struct _hs_block {
	ck_epoch_entry_t epoch_entry; /* deferred free */
	struct kvrt_index *idx;       /* for the pending count */
	size_t size;                  /* bytes after the header */
	max_align_t data[];           /* the map */
};

static void *hs_malloc(size_t r)
{
	struct _hs_block *b = malloc(sizeof(*b) + r);
	if (!b)
		return NULL;
	b->idx = NULL;
	b->size = r;
	return b->data;
}

static void hs_block_free_cb(ck_epoch_entry_t *ee)
{
	struct _hs_block *b = (struct _hs_block *)((char *)ee - offsetof(struct _hs_block, epoch_entry));
	KVRT_TSAN_ACQUIRE(&b->idx->tsan_sync);
	b->idx->pending--;
	free(b);
}

static void hs_free(void *p, size_t b, bool defer)
{
	(void)b;
	if (!p)
		return;
	struct _hs_block *blk = (struct _hs_block *)((char *)p - offsetof(struct _hs_block, data));
	struct kvrt_index *idx = _writer_idx;
	if (defer && idx) {
		blk->idx = idx;
		idx->pending++;
		ck_epoch_call(&idx->wrec, &blk->epoch_entry, hs_block_free_cb);
		return;
	}
	free(blk);
}

static struct ck_malloc hs_allocator = {
	.malloc = hs_malloc,
	.realloc = NULL,
	.free = hs_free,
};

static unsigned long hs_hash(const void *k, unsigned long seed)
{
	const struct kvrt_chunk_key *key = k;
	/* Keys are XXH3 output: their low word is already uniform. */
	return (unsigned long)(key->lo ^ seed);
}

static bool hs_compare(const void *a, const void *b)
{
	const struct kvrt_chunk_key *x = a, *y = b;
	return x->lo == y->lo && x->hi == y->hi;
}

int kvrt_index_create(struct kvrt_index **out, const struct kvrt_index_config *cfg)
{
	*out = NULL;
	if (!cfg)
		return -EINVAL;
	struct kvrt_index *idx = aligned_alloc(KVRT_CACHELINE, sizeof(*idx));
	if (!idx)
		return -ENOMEM;
	memset(idx, 0, sizeof(*idx));
	unsigned long cap = cfg->capacity < 64 ? 64 : (unsigned long)cfg->capacity;
	if (!ck_hs_init(&idx->hs, CK_HS_MODE_SPMC | CK_HS_MODE_OBJECT | CK_HS_MODE_DELETE, hs_hash,
			hs_compare, &hs_allocator, cap, 0x6b7672746b767274ul))
		goto err_free;
	ck_epoch_init(&idx->epoch);
	ck_epoch_register(&idx->epoch, &idx->wrec, NULL);
	pthread_mutex_init(&idx->readers_lock, NULL);
	for (unsigned i = 0; i < OWNER_SHARDS; i++)
		pthread_mutex_init(&idx->shards[i].lock, NULL);
	atomic_init(&idx->clock, 1);
	atomic_init(&idx->pinned, 0);
	atomic_init(&idx->owners, 0);
	*out = idx;
	return 0;
err_free:
	free(idx);
	return -ENOMEM;
}

static void free_entry_now(struct kvrt_index_entry *e, void *arg)
{
	(void)arg;
	free(e);
}

void kvrt_index_destroy(struct kvrt_index *idx)
{
	if (!idx)
		return;
	kvrt_index_barrier(idx);
	for (unsigned i = 0; i < OWNER_SHARDS; i++) {
		struct _owner *o = idx->shards[i].head;
		while (o) {
			struct _owner *next = o->next;
			free(o->e);
			free(o);
			o = next;
		}
		pthread_mutex_destroy(&idx->shards[i].lock);
	}
	kvrt_index_foreach(idx, free_entry_now, NULL);
	ck_hs_destroy(&idx->hs);
	struct kvrt_index_reader *r = idx->readers;
	while (r) {
		struct kvrt_index_reader *next = r->all;
		free(r);
		r = next;
	}
	pthread_mutex_destroy(&idx->readers_lock);
	free(idx);
}

/* --- readers ------------------------------------------------------------- */

struct kvrt_index_reader *kvrt_index_reader_open(struct kvrt_index *idx)
{
	/* A record a closed reader left behind is reused first. */
	ck_epoch_record_t *rec = ck_epoch_recycle(&idx->epoch, NULL);
	if (rec)
		return (struct kvrt_index_reader *)rec;
	struct kvrt_index_reader *r = aligned_alloc(KVRT_CACHELINE, sizeof(*r));
	if (!r)
		return NULL;
	memset(r, 0, sizeof(*r));
	r->idx = idx;
	ck_epoch_register(&idx->epoch, &r->rec, NULL);
	pthread_mutex_lock(&idx->readers_lock);
	r->all = idx->readers;
	idx->readers = r;
	pthread_mutex_unlock(&idx->readers_lock);
	return r;
}

void kvrt_index_reader_close(struct kvrt_index_reader *r)
{
	if (r)
		ck_epoch_unregister(&r->rec);
}

static struct _shard *shard_of(struct kvrt_index *idx, uint64_t owner)
{
	uint64_t h = owner * 0x9e3779b97f4a7c15ull;
	return &idx->shards[h >> 58];
}

/* Shard lock held. */
static struct _owner *owner_find(struct _shard *s, uint64_t id, struct _owner ***link)
{
	struct _owner **pp = &s->head;
	for (; *pp; pp = &(*pp)->next)
		if ((*pp)->id == id)
			break;
	if (link)
		*link = pp;
	return *pp;
}

/* Shard lock held: owner id with room for `more` pins, created if absent. */
static struct _owner *owner_reserve(struct kvrt_index *idx, struct _shard *s, uint64_t id, size_t more)
{
	struct _owner *o = owner_find(s, id, NULL);
	if (!o) {
		o = calloc(1, sizeof(*o));
		if (!o)
			return NULL;
		o->id = id;
		o->since_ns = kvrt_now_ns();
		o->next = s->head;
		s->head = o;
		atomic_fetch_add_explicit(&idx->owners, 1, memory_order_relaxed);
	}
	if ((size_t)o->n + more > o->cap) {
		size_t cap = o->cap ? o->cap : 16;
		while (cap < (size_t)o->n + more)
			cap *= 2;
		if (cap > UINT32_MAX)
			return NULL;
		struct kvrt_index_entry **e = realloc(o->e, cap * sizeof(*e));
		if (!e)
			return NULL;
		o->e = e;
		o->cap = (uint32_t)cap;
	}
	return o;
}

/* Shard lock held: unlink and free an owner with no pins. */
static void owner_drop(struct kvrt_index *idx, struct _shard *s, struct _owner *o)
{
	struct _owner **pp;
	owner_find(s, o->id, &pp);
	*pp = o->next;
	free(o->e);
	free(o);
	atomic_fetch_sub_explicit(&idx->owners, 1, memory_order_relaxed);
}

/* Pin e unless it is dead. Returns the state after the pin, or 0 on failure
 * (a live state is never 0 after a pin: the pin count is >= 1). */
static uint64_t entry_pin(struct kvrt_index_entry *e)
{
	uint64_t s = atomic_load_explicit(&e->state, memory_order_acquire);
	for (;;) {
		if ((s & KVRT_INDEX_DEAD) || kvrt_index_state_pins(s) == UINT32_MAX)
			return 0;
		/* acq_rel: totally ordered with the writer's retire/demote CAS
		 * on this word, and our later slab reads stay after it. */
		if (atomic_compare_exchange_weak_explicit(&e->state, &s, s + 1, memory_order_acq_rel,
							  memory_order_acquire))
			return s + 1;
	}
}

static void entry_unpin(struct kvrt_index *idx, struct kvrt_index_entry *e)
{
	/* release: our reads of the slab happen before the writer's acquire
	 * CAS that frees or reuses it. */
	uint64_t old = atomic_fetch_sub_explicit(&e->state, 1, memory_order_release);
	KVRT_ASSERT(kvrt_index_state_pins(old) > 0);
	atomic_fetch_sub_explicit(&idx->pinned, 1, memory_order_relaxed);
}

size_t kvrt_index_lookup(struct kvrt_index_reader *r, const struct kvrt_chunk_key *keys, size_t n,
			 uint64_t owner, unsigned flags, struct kvrt_index_hit *hits)
{
	struct kvrt_index *idx = r->idx;
	struct _shard *sh = NULL;
	struct _owner *o = NULL;
	size_t found = 0;
	if (!n)
		return 0;
	if (flags & KVRT_INDEX_PIN) {
		sh = shard_of(idx, owner);
		pthread_mutex_lock(&sh->lock);
		o = owner_reserve(idx, sh, owner, n);
		if (!o) {
			/* A fresh owner created just now stays empty: drop it. */
			struct _owner *fresh = owner_find(sh, owner, NULL);
			if (fresh && !fresh->n)
				owner_drop(idx, sh, fresh);
			pthread_mutex_unlock(&sh->lock);
			return 0;
		}
	}
	/* Stamps base .. base+n-1, chunk i gets base+n-1-i: chunk 0 is the most
	 * recent, so a prefix's later chunks are evicted first. */
	uint64_t base = 0;
	if (flags & KVRT_INDEX_TOUCH)
		base = atomic_fetch_add_explicit(&idx->clock, n, memory_order_relaxed);

	ck_epoch_begin(&r->rec, NULL);
	for (; found < n; found++) {
		unsigned long h = CK_HS_HASH(&idx->hs, hs_hash, &keys[found]);
		struct kvrt_index_entry *e = ck_hs_get(&idx->hs, h, &keys[found]);
		if (!e)
			break;
		KVRT_TSAN_ACQUIRE(e); /* pairs with the release before ck_hs_put */
		uint64_t s;
		if (flags & KVRT_INDEX_PIN) {
			s = entry_pin(e);
			if (!s)
				break;
			o->e[o->n++] = e;
			atomic_fetch_add_explicit(&idx->pinned, 1, memory_order_relaxed);
		} else {
			s = atomic_load_explicit(&e->state, memory_order_acquire);
			if (s & KVRT_INDEX_DEAD)
				break;
		}
		if (flags & KVRT_INDEX_TOUCH) {
			atomic_store_explicit(&e->atime, base + n - 1 - found, memory_order_relaxed);
			uint32_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
			if (f < 3)
				atomic_store_explicit(&e->freq, f + 1, memory_order_relaxed);
		}
		if (hits) {
			hits[found].entry = e;
			hits[found].tier = kvrt_index_state_tier(s);
			hits[found].slab = atomic_load_explicit(&e->slab, memory_order_relaxed);
		}
	}
	/* TSan: our accesses to entries happen before the writer frees them
	 * (ck_epoch_end's fence, invisible to TSan). */
	KVRT_TSAN_RELEASE(&idx->tsan_sync);
	ck_epoch_end(&r->rec, NULL);

	if (sh) {
		if (!o->n)
			owner_drop(idx, sh, o);
		pthread_mutex_unlock(&sh->lock);
	}
	return found;
}

/* --- pins ---------------------------------------------------------------- */

int kvrt_index_unpin(struct kvrt_index *idx, uint64_t owner, struct kvrt_chunk_key key)
{
	struct _shard *sh = shard_of(idx, owner);
	int rc = -ENOENT;
	pthread_mutex_lock(&sh->lock);
	struct _owner *o = owner_find(sh, owner, NULL);
	if (o) {
		for (uint32_t i = 0; i < o->n; i++) {
			if (kvrt_chunk_key_eq(o->e[i]->key, key)) {
				entry_unpin(idx, o->e[i]);
				o->e[i] = o->e[--o->n];
				rc = 0;
				break;
			}
		}
		if (!o->n)
			owner_drop(idx, sh, o);
	}
	pthread_mutex_unlock(&sh->lock);
	return rc;
}

/* Shard lock held: release all of o's pins and drop it. */
static size_t owner_release(struct kvrt_index *idx, struct _shard *sh, struct _owner *o)
{
	size_t n = o->n;
	for (uint32_t i = 0; i < o->n; i++)
		entry_unpin(idx, o->e[i]);
	o->n = 0;
	owner_drop(idx, sh, o);
	return n;
}

size_t kvrt_index_unpin_owner(struct kvrt_index *idx, uint64_t owner)
{
	struct _shard *sh = shard_of(idx, owner);
	size_t n = 0;
	pthread_mutex_lock(&sh->lock);
	struct _owner *o = owner_find(sh, owner, NULL);
	if (o)
		n = owner_release(idx, sh, o);
	pthread_mutex_unlock(&sh->lock);
	return n;
}

size_t kvrt_index_unpin_expired(struct kvrt_index *idx, uint64_t before_ns)
{
	size_t n = 0;
	for (unsigned i = 0; i < OWNER_SHARDS; i++) {
		struct _shard *sh = &idx->shards[i];
		pthread_mutex_lock(&sh->lock);
		struct _owner *o = sh->head;
		while (o) {
			struct _owner *next = o->next;
			if (o->since_ns < before_ns) {
				kvrt_debug("index: owner %016llx held %u pins past its time-out",
					   (unsigned long long)o->id, o->n);
				n += owner_release(idx, sh, o);
			}
			o = next;
		}
		pthread_mutex_unlock(&sh->lock);
	}
	return n;
}

uint64_t kvrt_index_pinned(const struct kvrt_index *idx)
{
	return atomic_load_explicit(&idx->pinned, memory_order_relaxed);
}

uint64_t kvrt_index_owners(struct kvrt_index *idx)
{
	return atomic_load_explicit(&idx->owners, memory_order_relaxed);
}

/* --- writer -------------------------------------------------------------- */

struct kvrt_index_entry *kvrt_index_entry_new(struct kvrt_index *idx, struct kvrt_chunk_key key,
					      enum kvrt_tier tier)
{
	(void)idx;
	struct kvrt_index_entry *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->key = key;
	atomic_init(&e->state, (uint64_t)tier << KVRT_INDEX_TIER_SHIFT);
	atomic_init(&e->atime, 0);
	atomic_init(&e->freq, 0);
	atomic_init(&e->slab, UINT32_MAX);
	e->q_pos = UINT32_MAX;
	return e;
}

void kvrt_index_entry_free(struct kvrt_index *idx, struct kvrt_index_entry *e)
{
	(void)idx;
	free(e);
}

int kvrt_index_insert(struct kvrt_index *idx, struct kvrt_index_entry *e)
{
	unsigned long h = CK_HS_HASH(&idx->hs, hs_hash, &e->key);
	/* New entries start as the most recent. */
	uint64_t now = atomic_fetch_add_explicit(&idx->clock, 1, memory_order_relaxed);
	atomic_store_explicit(&e->atime, now, memory_order_relaxed);
	/* TSan stand-in for the store fence inside ck_hs_put: every field
	 * written above is published with the slot. */
	KVRT_TSAN_RELEASE(e);
	_writer_idx = idx;
	bool ok = ck_hs_put(&idx->hs, h, e);
	_writer_idx = NULL;
	if (ok)
		return 0;
	return ck_hs_get(&idx->hs, h, &e->key) ? -EEXIST : -ENOMEM;
}

struct kvrt_index_entry *kvrt_index_find(struct kvrt_index *idx, struct kvrt_chunk_key key)
{
	unsigned long h = CK_HS_HASH(&idx->hs, hs_hash, &key);
	return ck_hs_get(&idx->hs, h, &key);
}

static void entry_free_cb(ck_epoch_entry_t *ee)
{
	struct kvrt_index_entry *e =
		(struct kvrt_index_entry *)((char *)ee - offsetof(struct kvrt_index_entry, epoch_entry));
	/* Recover the index from the thread-local set by reclaim(). */
	struct kvrt_index *idx = _writer_idx;
	/* TSan: pairs with the readers' release at the end of their sections. */
	KVRT_TSAN_ACQUIRE(&idx->tsan_sync);
	idx->pending--;
	free(e);
}

bool kvrt_index_try_retire(struct kvrt_index *idx, struct kvrt_index_entry *e)
{
	uint64_t s = atomic_load_explicit(&e->state, memory_order_acquire);
	for (;;) {
		if (kvrt_index_state_pins(s) || (s & KVRT_INDEX_DEAD))
			return false;
		/* acq_rel: a pin that came first is seen (we fail); a pin that
		 * comes later sees DEAD. Acquire also orders the last pinner's
		 * reads (its release unpin) before the slab's reuse. */
		if (atomic_compare_exchange_weak_explicit(&e->state, &s, s | KVRT_INDEX_DEAD,
							  memory_order_acq_rel, memory_order_acquire))
			break;
	}
	unsigned long h = CK_HS_HASH(&idx->hs, hs_hash, &e->key);
	_writer_idx = idx;
	void *removed = ck_hs_remove(&idx->hs, h, &e->key);
	KVRT_ASSERT(removed == e);
	idx->pending++;
	ck_epoch_call(&idx->wrec, &e->epoch_entry, entry_free_cb);
	_writer_idx = NULL;
	return true;
}

void kvrt_index_detach(struct kvrt_index *idx, struct kvrt_index_entry *e)
{
	/* acq_rel, as retire: a pin that comes after sees DEAD and fails. */
	uint64_t s = atomic_fetch_or_explicit(&e->state, KVRT_INDEX_DEAD, memory_order_acq_rel);
	KVRT_ASSERT(!(s & KVRT_INDEX_DEAD));
	unsigned long h = CK_HS_HASH(&idx->hs, hs_hash, &e->key);
	_writer_idx = idx;
	void *removed = ck_hs_remove(&idx->hs, h, &e->key);
	_writer_idx = NULL;
	KVRT_ASSERT(removed == e);
}

bool kvrt_index_try_release_detached(struct kvrt_index *idx, struct kvrt_index_entry *e)
{
	/* acquire: the last pinner's reads (its release unpin) happen before
	 * the caller reuses the slab. */
	uint64_t s = atomic_load_explicit(&e->state, memory_order_acquire);
	KVRT_ASSERT(s & KVRT_INDEX_DEAD);
	if (kvrt_index_state_pins(s))
		return false;
	_writer_idx = idx;
	idx->pending++;
	ck_epoch_call(&idx->wrec, &e->epoch_entry, entry_free_cb);
	_writer_idx = NULL;
	return true;
}

bool kvrt_index_try_demote(struct kvrt_index_entry *e, enum kvrt_tier to)
{
	uint64_t s = atomic_load_explicit(&e->state, memory_order_acquire);
	for (;;) {
		if (kvrt_index_state_pins(s) || (s & KVRT_INDEX_DEAD) ||
		    kvrt_index_state_tier(s) != KVRT_TIER_CPU)
			return false;
		uint64_t ns = (s & ~KVRT_INDEX_TIER_MASK) | ((uint64_t)to << KVRT_INDEX_TIER_SHIFT);
		/* acq_rel: same argument as retire; pins after this see `to`. */
		if (atomic_compare_exchange_weak_explicit(&e->state, &s, ns, memory_order_acq_rel,
							  memory_order_acquire))
			return true;
	}
}

void kvrt_index_promote(struct kvrt_index_entry *e, uint32_t slab)
{
	atomic_store_explicit(&e->slab, slab, memory_order_relaxed);
	uint64_t s = atomic_load_explicit(&e->state, memory_order_relaxed);
	for (;;) {
		uint64_t ns = (s & ~KVRT_INDEX_TIER_MASK) | ((uint64_t)KVRT_TIER_CPU << KVRT_INDEX_TIER_SHIFT);
		/* release: the slab store (and the slab's bytes) are visible to
		 * whoever sees tier CPU with an acquire load. */
		if (atomic_compare_exchange_weak_explicit(&e->state, &s, ns, memory_order_release,
							  memory_order_relaxed))
			return;
	}
}

void kvrt_index_reclaim(struct kvrt_index *idx)
{
	_writer_idx = idx;
	ck_epoch_poll(&idx->wrec);
	_writer_idx = NULL;
}

void kvrt_index_barrier(struct kvrt_index *idx)
{
	_writer_idx = idx;
	ck_epoch_barrier(&idx->wrec);
	_writer_idx = NULL;
}

void kvrt_index_gc(struct kvrt_index *idx)
{
	_writer_idx = idx;
	ck_hs_gc(&idx->hs, 0, 0);
	_writer_idx = NULL;
}

uint64_t kvrt_index_count(struct kvrt_index *idx)
{
	return ck_hs_count(&idx->hs);
}

uint64_t kvrt_index_pending_frees(struct kvrt_index *idx)
{
	return idx->pending;
}

void kvrt_index_foreach(struct kvrt_index *idx, void (*fn)(struct kvrt_index_entry *e, void *arg),
			void *arg)
{
	ck_hs_iterator_t it = CK_HS_ITERATOR_INITIALIZER;
	void *p;
	while (ck_hs_next(&idx->hs, &it, &p))
		fn(p, arg);
}
