/* actors/policy.c: see policy.h. */
#include "actors/policy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* q_id values: where an entry is. */
enum { Q_NONE = 0, Q_HEAP = 1, Q_SMALL = 2, Q_MAIN = 3 };

/* An intrusive FIFO through q_prev/q_next: insert at head, evict at tail. */
struct _fifo {
	struct kvrt_index_entry *head; /* newest */
	struct kvrt_index_entry *tail; /* oldest: next to leave */
	uint32_t n;                    /* entries */
};

/* The ghost FIFO: recently evicted keys (their low words), a ring of seq
 * numbers plus an open-addressing table; a slot is live while its seq is
 * within the last `cap` insertions. */
struct _ghost {
	uint64_t *key;  /* table: key.lo | 1 (0 = never used) */
	uint64_t *seq;  /* table: insertion number of that key */
	uint32_t mask;  /* table size - 1 (size >= 4 * cap) */
	uint32_t cap;   /* keys remembered */
	uint32_t used;  /* slots ever filled (live or stale) */
	uint64_t next;  /* next insertion number (starts at 1) */
};

struct kvrt_policy {
	enum kvrt_policy_kind kind;  /* LRU or S3-FIFO */
	uint32_t capacity;           /* most entries */
	uint32_t count;              /* entries held */
	/* LRU */
	struct kvrt_index_entry **heap; /* min-heap on q_stamp */
	uint32_t heap_n;                /* entries in heap */
	/* S3-FIFO */
	struct _fifo small, main;       /* the two queues */
	uint32_t small_cap;             /* small queue's share: 10% */
	struct _ghost ghost;            /* evicted keys */
};

int kvrt_policy_parse(const char *name, enum kvrt_policy_kind *out)
{
	if (!name || !strcasecmp(name, "LRU")) {
		*out = KVRT_POLICY_LRU;
		return 0;
	}
	if (!strcasecmp(name, "S3FIFO") || !strcasecmp(name, "S3-FIFO")) {
		*out = KVRT_POLICY_S3FIFO;
		return 0;
	}
	return -EINVAL;
}

const char *kvrt_policy_name(enum kvrt_policy_kind k)
{
	return k == KVRT_POLICY_S3FIFO ? "S3FIFO" : "LRU";
}

static uint64_t atime_of(struct kvrt_index_entry *e)
{
	return atomic_load_explicit(&e->atime, memory_order_relaxed);
}

/* --- LRU heap ------------------------------------------------------------ */

static void heap_set(struct kvrt_policy *p, uint32_t i, struct kvrt_index_entry *e)
{
	p->heap[i] = e;
	e->q_pos = i;
}

static void heap_up(struct kvrt_policy *p, uint32_t i)
{
	struct kvrt_index_entry *e = p->heap[i];
	while (i > 0) {
		uint32_t parent = (i - 1) / 2;
		if (p->heap[parent]->q_stamp <= e->q_stamp)
			break;
		heap_set(p, i, p->heap[parent]);
		i = parent;
	}
	heap_set(p, i, e);
}

static void heap_down(struct kvrt_policy *p, uint32_t i)
{
	struct kvrt_index_entry *e = p->heap[i];
	for (;;) {
		uint32_t c = 2 * i + 1;
		if (c >= p->heap_n)
			break;
		if (c + 1 < p->heap_n && p->heap[c + 1]->q_stamp < p->heap[c]->q_stamp)
			c++;
		if (p->heap[c]->q_stamp >= e->q_stamp)
			break;
		heap_set(p, i, p->heap[c]);
		i = c;
	}
	heap_set(p, i, e);
}

static void heap_push(struct kvrt_policy *p, struct kvrt_index_entry *e)
{
	e->q_stamp = atime_of(e);
	e->q_id = Q_HEAP;
	heap_set(p, p->heap_n++, e);
	heap_up(p, e->q_pos);
}

static void heap_del(struct kvrt_policy *p, struct kvrt_index_entry *e)
{
	uint32_t i = e->q_pos;
	struct kvrt_index_entry *last = p->heap[--p->heap_n];
	if (i != p->heap_n) {
		heap_set(p, i, last);
		heap_up(p, i);
		heap_down(p, last->q_pos);
	}
	e->q_pos = UINT32_MAX;
	e->q_id = Q_NONE;
}

static struct kvrt_index_entry *lru_victim(struct kvrt_policy *p)
{
	while (p->heap_n) {
		struct kvrt_index_entry *e = p->heap[0];
		uint64_t now = atime_of(e);
		if (now != e->q_stamp) {
			/* Touched since placed: stamps only grow, re-place it. */
			e->q_stamp = now;
			heap_down(p, 0);
			continue;
		}
		heap_del(p, e);
		return e;
	}
	return NULL;
}

/* --- S3-FIFO ------------------------------------------------------------- */

static void fifo_push_head(struct _fifo *q, struct kvrt_index_entry *e)
{
	e->q_prev = NULL;
	e->q_next = q->head;
	if (q->head)
		q->head->q_prev = e;
	else
		q->tail = e;
	q->head = e;
	q->n++;
}

static void fifo_push_tail(struct _fifo *q, struct kvrt_index_entry *e)
{
	e->q_next = NULL;
	e->q_prev = q->tail;
	if (q->tail)
		q->tail->q_next = e;
	else
		q->head = e;
	q->tail = e;
	q->n++;
}

static void fifo_del(struct _fifo *q, struct kvrt_index_entry *e)
{
	if (e->q_prev)
		e->q_prev->q_next = e->q_next;
	else
		q->head = e->q_next;
	if (e->q_next)
		e->q_next->q_prev = e->q_prev;
	else
		q->tail = e->q_prev;
	e->q_prev = e->q_next = NULL;
	q->n--;
}

static bool ghost_live(const struct _ghost *g, uint64_t seq)
{
	return seq && seq + g->cap >= g->next;
}

static bool ghost_has(const struct _ghost *g, uint64_t lo)
{
	uint64_t k = lo | 1;
	for (uint32_t i = (uint32_t)(lo >> 7) & g->mask;; i = (i + 1) & g->mask) {
		if (!g->key[i])
			return false;
		if (g->key[i] == k && ghost_live(g, g->seq[i]))
			return true;
	}
}

static void ghost_rebuild(struct _ghost *g)
{
	uint32_t size = g->mask + 1;
	uint64_t *ok = g->key, *os = g->seq;
	uint64_t *nk = calloc(size, sizeof(uint64_t)), *ns = calloc(size, sizeof(uint64_t));
	if (!nk || !ns) {
		/* Out of memory: forget every ghost (only costs scan resistance). */
		free(nk);
		free(ns);
		memset(ok, 0, size * sizeof(uint64_t));
		memset(os, 0, size * sizeof(uint64_t));
		g->used = 0;
		return;
	}
	g->key = nk;
	g->seq = ns;
	g->used = 0;
	for (uint32_t j = 0; j < size; j++) {
		if (!ok[j] || !ghost_live(g, os[j]))
			continue;
		uint32_t i = (uint32_t)(ok[j] >> 7) & g->mask;
		while (g->key[i])
			i = (i + 1) & g->mask;
		g->key[i] = ok[j];
		g->seq[i] = os[j];
		g->used++;
	}
	free(ok);
	free(os);
}

static void ghost_add(struct _ghost *g, uint64_t lo)
{
	uint64_t k = lo | 1;
	if (g->used >= 3 * (g->mask + 1) / 4)
		ghost_rebuild(g);
	uint32_t i = (uint32_t)(lo >> 7) & g->mask, stale = UINT32_MAX;
	for (;; i = (i + 1) & g->mask) {
		if (!g->key[i])
			break;
		if (g->key[i] == k) { /* refresh */
			stale = i;
			break;
		}
		if (stale == UINT32_MAX && !ghost_live(g, g->seq[i]))
			stale = i;
	}
	if (stale != UINT32_MAX) {
		i = stale;
	} else {
		g->used++;
	}
	g->key[i] = k;
	g->seq[i] = g->next++;
}

static void s3_insert(struct kvrt_policy *p, struct kvrt_index_entry *e)
{
	atomic_store_explicit(&e->freq, 0, memory_order_relaxed);
	if (ghost_has(&p->ghost, e->key.lo)) {
		e->q_id = Q_MAIN;
		fifo_push_head(&p->main, e);
	} else {
		e->q_id = Q_SMALL;
		fifo_push_head(&p->small, e);
	}
}

static struct kvrt_index_entry *s3_victim(struct kvrt_policy *p)
{
	/* Bounded: each entry moves at most 1 (small->main) + 3 (freq) times. */
	for (;;) {
		if (p->small.n && (p->small.n >= p->small_cap || !p->main.n)) {
			struct kvrt_index_entry *e = p->small.tail;
			fifo_del(&p->small, e);
			if (atomic_load_explicit(&e->freq, memory_order_relaxed) > 0) {
				atomic_store_explicit(&e->freq, 0, memory_order_relaxed);
				e->q_id = Q_MAIN;
				fifo_push_head(&p->main, e);
				continue;
			}
			e->q_id = Q_NONE;
			ghost_add(&p->ghost, e->key.lo);
			return e;
		}
		if (!p->main.n)
			return NULL;
		struct kvrt_index_entry *e = p->main.tail;
		fifo_del(&p->main, e);
		uint32_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
		if (f > 0) {
			atomic_store_explicit(&e->freq, f - 1, memory_order_relaxed);
			fifo_push_head(&p->main, e);
			continue;
		}
		e->q_id = Q_NONE;
		return e;
	}
}

/* --- common -------------------------------------------------------------- */

int kvrt_policy_create(struct kvrt_policy **out, enum kvrt_policy_kind kind, uint32_t capacity)
{
	*out = NULL;
	if (!capacity || (kind != KVRT_POLICY_LRU && kind != KVRT_POLICY_S3FIFO))
		return -EINVAL;
	struct kvrt_policy *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->kind = kind;
	p->capacity = capacity;
	if (kind == KVRT_POLICY_LRU) {
		p->heap = calloc(capacity, sizeof(*p->heap));
		if (!p->heap)
			goto err;
	} else {
		p->small_cap = capacity / 10 ? capacity / 10 : 1;
		uint32_t size = 16;
		while (size < 4ull * capacity)
			size *= 2;
		p->ghost.key = calloc(size, sizeof(uint64_t));
		p->ghost.seq = calloc(size, sizeof(uint64_t));
		if (!p->ghost.key || !p->ghost.seq)
			goto err;
		p->ghost.mask = size - 1;
		p->ghost.cap = capacity;
		p->ghost.next = 1;
	}
	*out = p;
	return 0;
err:
	kvrt_policy_destroy(p);
	return -ENOMEM;
}

void kvrt_policy_destroy(struct kvrt_policy *p)
{
	if (!p)
		return;
	free(p->heap);
	free(p->ghost.key);
	free(p->ghost.seq);
	free(p);
}

void kvrt_policy_insert(struct kvrt_policy *p, struct kvrt_index_entry *e)
{
	KVRT_ASSERT(e->q_id == Q_NONE);
	KVRT_ASSERT(p->count < p->capacity);
	if (p->kind == KVRT_POLICY_LRU)
		heap_push(p, e);
	else
		s3_insert(p, e);
	p->count++;
}

void kvrt_policy_remove(struct kvrt_policy *p, struct kvrt_index_entry *e)
{
	switch (e->q_id) {
	case Q_HEAP:
		heap_del(p, e);
		break;
	case Q_SMALL:
		fifo_del(&p->small, e);
		break;
	case Q_MAIN:
		fifo_del(&p->main, e);
		break;
	default:
		return;
	}
	e->q_id = Q_NONE;
	p->count--;
}

struct kvrt_index_entry *kvrt_policy_victim(struct kvrt_policy *p)
{
	struct kvrt_index_entry *e = p->kind == KVRT_POLICY_LRU ? lru_victim(p) : s3_victim(p);
	if (e)
		p->count--;
	return e;
}

void kvrt_policy_putback(struct kvrt_policy *p, struct kvrt_index_entry *e)
{
	KVRT_ASSERT(e->q_id == Q_NONE);
	if (p->kind == KVRT_POLICY_LRU) {
		heap_push(p, e);
	} else {
		/* Back at the eviction end of main: it was the next to go. */
		e->q_id = Q_MAIN;
		fifo_push_tail(&p->main, e);
	}
	p->count++;
}

uint32_t kvrt_policy_count(const struct kvrt_policy *p)
{
	return p->count;
}
