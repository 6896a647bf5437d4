/* runtime/trace.c: see trace.h.
 *
 * Records. A trace site appends one 32-byte struct _kvrt_trace_rec to the
 * calling thread's buffer: a slice (start, end, flow id ending here), a
 * counter sample (time, value) or a flow start (time, flow id). Buffers are
 * fixed arrays that never wrap: a full buffer counts what it refuses
 * ("dropped") instead of overwriting, so a record, once published, is never
 * written again in its session and the drain can never read a torn one.
 *
 * Publication. The owner thread writes recs[count] and then stores count+1
 * with release; the drain loads count with acquire and reads only records
 * below it. The owner is the only writer of its buffer's records, count and
 * dropped, so it keeps them with plain loads and stores (atomics with relaxed
 * loads: no read-modify-write on the hot path).
 *
 * Sessions. Every kvrt_trace_start begins a session (g.sess, counted from 1).
 * A buffer is tagged with the session its records belong to (buf->sess). On
 * its first record of a new session the owner resets its buffer (count = 0,
 * dropped = 0, a new array if KVRT_TRACE_BUFFER changed) and then publishes
 * the tag with release; the drain of session S (kvrt_trace_stop, under
 * g.lock) loads each tag with acquire and skips buffers not tagged S. A reset
 * cannot overlap the drain of the session it leaves: the owner learns of the
 * new session from the acquire load of g.sess, stored by kvrt_trace_start
 * after it took g.lock, which the previous stop released after its drain.
 *
 * Lifetime. Buffers are never freed: kvrt_trace_stop may run while other
 * threads are past their KVRT_TRACING() check and still writing, and a thread
 * may exit before the drain (its records must survive). A buffer whose thread
 * exited (pthread key destructor: orphan) is handed to the next new thread
 * once its records were drained, so thread churn does not grow memory. A
 * buffer's array is allocated with calloc (large: mmap'd, pages touched only
 * when used), once per thread, and again only when a session asks for a
 * different capacity. Nothing on the record path locks, allocates or makes a
 * syscall after the thread's first record of a session.
 *
 * Output. Chrome trace JSON (ph X, C, s, f, M, i), timestamps in microseconds
 * from the session's start with nanosecond digits. Perfetto binds a flow
 * start to the slice open on its thread, but posts often come from threads
 * that are not inside any slice (vLLM's), so each flow start is also written
 * as a short "post <name>" slice (cat kvrt.post, at most 1 us, clamped so it
 * nests inside the thread's surrounding slice and ends before the thread's
 * next slice or post) with the "s" 1 ns into it; the "f" sits 1 ns into the
 * handling slice (bp "e"). Only flows with both ends in the trace get arrows.
 */
#include "runtime/trace.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "runtime/log.h"

/* Read through KVRT_TRACING(): 0 off, 1 on. Written under g.lock. */
int _kvrt_trace_on;

#define DEFAULT_CAP (1u << 18)        /* records per thread (8 MiB) */
#define MAX_CAP (1u << 26)            /* 2 GiB per thread is surely a typo */
#define POST_NS 1000                  /* longest "post" slice */

/* Record kinds, in the top two bits of _kvrt_trace_rec.kind_id. */
enum { REC_SLICE = 0, REC_COUNTER = 1, REC_FLOW = 2 };
#define KIND_SHIFT 62
#define ID_MASK ((UINT64_C(1) << KIND_SHIFT) - 1)

/* One trace record: 32 bytes, two per cache line. */
struct _kvrt_trace_rec {
	uint64_t t0;      /* kvrt_now_ns: slice start, sample or flow time */
	uint64_t v;       /* slice end (ns), or counter value (int64 bits) */
	uint64_t kind_id; /* kind << KIND_SHIFT | flow id (0: none) */
	const char *name; /* literal or interned: lives past the drain */
};
_Static_assert(sizeof(struct _kvrt_trace_rec) == 32, "records are 32 bytes");

/* One thread's buffer. */
struct _kvrt_trace_buf {
	/* Owner thread only (and the drain, ordered by sess/count). */
	struct _kvrt_trace_rec *recs;  /* cap records; owner writes [count, cap) */
	uint32_t cap;                  /* records recs holds */
	uint32_t gen;                  /* session the owner last reset for */
	_Atomic uint32_t count;        /* records published: release by owner */
	_Atomic uint32_t sess;         /* session of the records: release by owner */
	_Atomic uint64_t dropped;      /* records refused (buffer full) this session */
	_Atomic(const char *) name;    /* kvrt_trace_thread_name (interned) or NULL */

	/* Under g.lock. */
	struct _kvrt_trace_buf *next;  /* registry list */
	int tid;                       /* gettid() of the owner */
	bool orphan;                   /* the owner exited; may be adopted */
	char os_name[16];              /* the thread's OS name at registration */
};

static struct {
	pthread_mutex_t lock;            /* start/stop/registration/drain */
	struct _kvrt_trace_buf *bufs;    /* every buffer ever made */
	bool running;                    /* between start and stop */
	char *path;                      /* output, while running */
	uint64_t start_ns;               /* session start (kvrt_now_ns) */
	uint32_t drained;                /* last session written by stop */
	_Atomic uint32_t sess;           /* current session; release by start */
	_Atomic uint32_t cap;            /* records per buffer this session */
	_Atomic uint64_t next_flow;      /* flow ids handed out */
	_Atomic uint64_t lost;           /* records lost to allocation failure */
	pthread_key_t key;               /* thread exit -> orphan */
	pthread_once_t key_once;
} g = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.key_once = PTHREAD_ONCE_INIT,
};

static __thread struct _kvrt_trace_buf *tls_buf; /* this thread's buffer */
static __thread const char *tls_name;            /* set by thread_name */

/* ---- interning ------------------------------------------------------ */

struct intern_entry {
	struct intern_entry *next; /* hash chain */
	uint64_t hash;             /* of s */
	char s[];                  /* the copy */
};

static struct {
	pthread_mutex_t lock;
	struct intern_entry **tab; /* nbuckets chains */
	size_t nbuckets;           /* power of two, or 0 before the first */
	size_t n;                  /* entries */
} interned = {.lock = PTHREAD_MUTEX_INITIALIZER};

static uint64_t hash_str(const char *s)
{
	uint64_t h = 1469598103934665603u; /* FNV-1a */
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211u;
	return h;
}

static void intern_grow(void)
{
	size_t nb = interned.nbuckets ? interned.nbuckets * 2 : 64;
	struct intern_entry **tab = calloc(nb, sizeof *tab);
	if (!tab)
		return; /* longer chains, still correct */
	for (size_t i = 0; i < interned.nbuckets; i++) {
		struct intern_entry *e = interned.tab[i], *nx;
		for (; e; e = nx) {
			nx = e->next;
			e->next = tab[e->hash & (nb - 1)];
			tab[e->hash & (nb - 1)] = e;
		}
	}
	free(interned.tab);
	interned.tab = tab;
	interned.nbuckets = nb;
}

const char *kvrt_trace_intern(const char *s)
{
	if (!s)
		return NULL;
	uint64_t h = hash_str(s);
	const char *out = NULL;
	pthread_mutex_lock(&interned.lock);
	if (interned.n >= interned.nbuckets)
		intern_grow();
	if (interned.nbuckets) {
		struct intern_entry **head = &interned.tab[h & (interned.nbuckets - 1)];
		for (struct intern_entry *e = *head; e; e = e->next)
			if (e->hash == h && !strcmp(e->s, s)) {
				out = e->s;
				goto done;
			}
		size_t len = strlen(s);
		struct intern_entry *e = malloc(sizeof *e + len + 1);
		if (e) {
			e->hash = h;
			memcpy(e->s, s, len + 1);
			e->next = *head;
			*head = e;
			interned.n++;
			out = e->s;
		}
	}
done:
	pthread_mutex_unlock(&interned.lock);
	/* Out of memory: a name the caller must keep alive is better than
	 * none; callers pass their own copies (actor names) here. */
	return out ? out : "?";
}

/* ---- buffers -------------------------------------------------------- */

/* Thread exit: the buffer keeps its records for the drain and may be handed
 * to a later thread once they are written out. */
static void on_thread_exit(void *p)
{
	struct _kvrt_trace_buf *b = p;
	pthread_mutex_lock(&g.lock);
	b->orphan = true;
	pthread_mutex_unlock(&g.lock);
	tls_buf = NULL;
}

static void make_key(void)
{
	if (pthread_key_create(&g.key, on_thread_exit) != 0)
		g.key = (pthread_key_t)-1; /* no recycling; buffers still kept */
}

/* A buffer for the calling thread: an orphan whose records were drained, or
 * a new one. NULL when out of memory. */
static struct _kvrt_trace_buf *buf_register(uint32_t cap)
{
	pthread_once(&g.key_once, make_key);
	pthread_mutex_lock(&g.lock);
	struct _kvrt_trace_buf *b;
	for (b = g.bufs; b; b = b->next)
		if (b->orphan && b->cap == cap &&
		    atomic_load_explicit(&b->sess, memory_order_relaxed) <= g.drained)
			break;
	if (b) {
		b->orphan = false;
	} else {
		b = calloc(1, sizeof *b);
		struct _kvrt_trace_rec *recs = calloc(cap, sizeof *recs);
		if (!b || !recs) {
			free(b);
			free(recs);
			pthread_mutex_unlock(&g.lock);
			return NULL;
		}
		b->recs = recs;
		b->cap = cap;
		b->next = g.bufs;
		g.bufs = b;
	}
	b->tid = (int)syscall(SYS_gettid);
	memset(b->os_name, 0, sizeof b->os_name);
	prctl(PR_GET_NAME, b->os_name, 0, 0, 0);
	b->os_name[sizeof b->os_name - 1] = 0;
	b->gen = 0; /* forces the reset in buf_attach */
	atomic_store_explicit(&b->name, tls_name, memory_order_relaxed);
	pthread_mutex_unlock(&g.lock);
	if (g.key != (pthread_key_t)-1)
		pthread_setspecific(g.key, b);
	return b;
}

/* Slow path of buf_get: first record of this thread, or of a new session. */
static struct _kvrt_trace_buf *buf_attach(uint32_t sess)
{
	uint32_t cap = atomic_load_explicit(&g.cap, memory_order_relaxed);
	struct _kvrt_trace_buf *b = tls_buf;
	if (!b) {
		b = buf_register(cap);
		if (!b)
			return NULL;
		tls_buf = b;
	}
	if (b->cap != cap) {
		/* No drain reads this array any more (see "Sessions"), and
		 * none reads the new one before the sess store below. */
		struct _kvrt_trace_rec *recs = calloc(cap, sizeof *recs);
		if (recs) {
			free(b->recs);
			b->recs = recs;
			b->cap = cap;
		}
	}
	atomic_store_explicit(&b->count, 0, memory_order_relaxed);
	atomic_store_explicit(&b->dropped, 0, memory_order_relaxed);
	b->gen = sess;
	/* Release: a drain that sees this session's tag sees the reset above. */
	atomic_store_explicit(&b->sess, sess, memory_order_release);
	return b;
}

/* Append one record for the calling thread. */
static inline void rec_put(uint64_t t0, uint64_t v, uint64_t kind_id, const char *name)
{
	/* Acquire: pairs with kvrt_trace_start's release, so a new session's
	 * capacity is seen, and a reset comes after the previous drain. */
	uint32_t sess = atomic_load_explicit(&g.sess, memory_order_acquire);
	struct _kvrt_trace_buf *b = tls_buf;
	if (KVRT_UNLIKELY(!b || b->gen != sess)) {
		b = buf_attach(sess);
		if (!b) {
			atomic_fetch_add_explicit(&g.lost, 1, memory_order_relaxed);
			return;
		}
	}
	uint32_t n = atomic_load_explicit(&b->count, memory_order_relaxed);
	if (KVRT_UNLIKELY(n >= b->cap)) {
		atomic_store_explicit(&b->dropped,
				      atomic_load_explicit(&b->dropped, memory_order_relaxed) + 1,
				      memory_order_relaxed);
		return;
	}
	b->recs[n] = (struct _kvrt_trace_rec){.t0 = t0, .v = v, .kind_id = kind_id, .name = name};
	/* Release: the drain's acquire load of count sees the record whole. */
	atomic_store_explicit(&b->count, n + 1, memory_order_release);
}

/* ---- record API ----------------------------------------------------- */

void kvrt_trace_thread_name(const char *name)
{
	tls_name = kvrt_trace_intern(name);
	/* Release: the drain (acquire) reads the string through the pointer. */
	if (tls_buf)
		atomic_store_explicit(&tls_buf->name, tls_name, memory_order_release);
}

uint64_t kvrt_trace_flow_begin(const char *name)
{
	uint64_t id = (atomic_fetch_add_explicit(&g.next_flow, 1, memory_order_relaxed) & ID_MASK) + 1;
	if (id > ID_MASK)
		id = 1;
	if (KVRT_TRACING())
		rec_put(kvrt_now_ns(), 0, (uint64_t)REC_FLOW << KIND_SHIFT | id, name);
	return id;
}

void kvrt_trace_slice(const char *name, uint64_t start_ns, uint64_t end_ns, uint64_t flow)
{
	if (KVRT_TRACING())
		rec_put(start_ns, end_ns, (uint64_t)REC_SLICE << KIND_SHIFT | (flow & ID_MASK), name);
}

void kvrt_trace_counter(const char *name, int64_t value)
{
	if (KVRT_TRACING())
		rec_put(kvrt_now_ns(), (uint64_t)value, (uint64_t)REC_COUNTER << KIND_SHIFT, name);
}

/* ---- JSON writer ---------------------------------------------------- */

struct jw {
	int fd;            /* output, or -1 after an error */
	int err;           /* first errno seen, 0 if none */
	size_t len;        /* bytes in buf */
	char buf[1 << 16]; /* pending output */
};

static void jw_flush(struct jw *w)
{
	size_t off = 0;
	while (off < w->len && !w->err) {
		ssize_t r = write(w->fd, w->buf + off, w->len - off);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			w->err = errno;
		} else if (r == 0) {
			w->err = EIO;
		} else {
			off += (size_t)r;
		}
	}
	w->len = 0;
}

static void jw_put(struct jw *w, const char *s, size_t n)
{
	while (n) {
		if (w->len == sizeof w->buf)
			jw_flush(w);
		size_t k = sizeof w->buf - w->len;
		if (k > n)
			k = n;
		memcpy(w->buf + w->len, s, k);
		w->len += k;
		s += k;
		n -= k;
	}
}

static void jw_s(struct jw *w, const char *s)
{
	jw_put(w, s, strlen(s));
}

__attribute__((format(printf, 2, 3))) static void jw_f(struct jw *w, const char *fmt, ...)
{
	char tmp[128];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n > 0)
		jw_put(w, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s)
{
	unsigned c = s[0];
	size_t n;
	uint32_t cp;
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		n = 2, cp = c & 0x1f;
	else if (c >= 0xe0 && c <= 0xef)
		n = 3, cp = c & 0x0f;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4, cp = c & 0x07;
	else
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0; /* also stops at the terminating NUL */
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return n;
}

/* A JSON string: quotes, backslashes and control characters escaped, bytes
 * that are not UTF-8 replaced by U+FFFD (the file stays valid JSON). */
static void jw_str(struct jw *w, const char *prefix, const char *s)
{
	jw_put(w, "\"", 1);
	if (prefix)
		jw_s(w, prefix);
	if (!s)
		s = "?";
	const unsigned char *p = (const unsigned char *)s;
	while (*p) {
		const unsigned char *run = p;
		size_t k;
		while (*p >= 0x20 && *p != '"' && *p != '\\' && (k = utf8_len(p)) > 0)
			p += k;
		jw_put(w, (const char *)run, (size_t)(p - run));
		if (!*p)
			break;
		unsigned c = *p;
		if (c == '"')
			jw_put(w, "\\\"", 2);
		else if (c == '\\')
			jw_put(w, "\\\\", 2);
		else if (c == '\n')
			jw_put(w, "\\n", 2);
		else if (c == '\t')
			jw_put(w, "\\t", 2);
		else if (c == '\r')
			jw_put(w, "\\r", 2);
		else if (c < 0x20)
			jw_f(w, "\\u%04x", c);
		else
			jw_put(w, "\\ufffd", 6);
		p++;
	}
	jw_put(w, "\"", 1);
}

/* A time in microseconds with nanosecond digits, relative to base. */
static void jw_us(struct jw *w, uint64_t ns, uint64_t base)
{
	bool neg = ns < base;
	uint64_t d = neg ? base - ns : ns - base;
	jw_f(w, "%s%" PRIu64 ".%03u", neg ? "-" : "", d / 1000, (unsigned)(d % 1000));
}

/* ---- drain ---------------------------------------------------------- */

/* Open-addressing map from flow id to its name (NULL: present, no name). */
struct flow_map {
	uint64_t *ids;      /* 0 = empty slot */
	const char **names; /* parallel to ids */
	size_t mask;        /* slots - 1 */
};

static int flow_map_init(struct flow_map *m, size_t n)
{
	size_t slots = 16;
	while (slots < 2 * n)
		slots *= 2;
	m->ids = calloc(slots, sizeof *m->ids);
	m->names = calloc(slots, sizeof *m->names);
	m->mask = slots - 1;
	if (!m->ids || !m->names) {
		free(m->ids);
		free(m->names);
		m->ids = NULL;
		m->names = NULL;
		return -ENOMEM;
	}
	return 0;
}

static void flow_map_put(struct flow_map *m, uint64_t id, const char *name)
{
	size_t i = (size_t)(id * 0x9e3779b97f4a7c15u) & m->mask;
	while (m->ids[i] && m->ids[i] != id)
		i = (i + 1) & m->mask;
	m->ids[i] = id;
	m->names[i] = name;
}

static bool flow_map_get(const struct flow_map *m, uint64_t id, const char **name)
{
	size_t i = (size_t)(id * 0x9e3779b97f4a7c15u) & m->mask;
	for (; m->ids[i]; i = (i + 1) & m->mask)
		if (m->ids[i] == id) {
			if (name)
				*name = m->names[i];
			return true;
		}
	return false;
}

/* One buffer of the session being written, as the drain found it. */
struct snap {
	struct _kvrt_trace_buf *b; /* the buffer */
	uint32_t n;                /* records published when the drain began */
	uint64_t dropped;          /* records refused */
};

/* Common fields of one event; opens the object, the caller closes it. */
static void ev_head(struct jw *w, bool *first, const char *name_prefix, const char *name,
		    const char *cat, const char *ph, uint64_t ts, uint64_t base, int pid, int tid)
{
	jw_s(w, *first ? "\n{\"name\":" : ",\n{\"name\":");
	*first = false;
	jw_str(w, name_prefix, name);
	if (cat) {
		jw_s(w, ",\"cat\":");
		jw_str(w, NULL, cat);
	}
	jw_f(w, ",\"ph\":\"%s\",\"ts\":", ph);
	jw_us(w, ts, base);
	jw_f(w, ",\"pid\":%d,\"tid\":%d", pid, tid);
}

/* How long each flow start's "post" slice lasts (ns), into d[i] for record
 * i: at most POST_NS, ending before the thread's next slice or post, and
 * inside the slice the post happened in. Walks the records backwards, so the
 * next ones (in time) are known. */
static void post_durations(const struct snap *s, uint16_t *d)
{
	const struct _kvrt_trace_rec *r = s->b->recs;
	bool have_slice = false, have_next = false; /* a slice / slice or post follows */
	uint64_t slice_t0 = 0, slice_t1 = 0, next_t0 = 0;
	for (uint32_t i = s->n; i-- > 0;) {
		unsigned kind = (unsigned)(r[i].kind_id >> KIND_SHIFT);
		uint64_t t0 = r[i].t0;
		if (kind == REC_SLICE) {
			have_slice = have_next = true;
			slice_t0 = next_t0 = t0;
			slice_t1 = r[i].v < t0 ? t0 : r[i].v;
		} else if (kind == REC_FLOW) {
			uint64_t len = POST_NS;
			if (have_next && next_t0 >= t0 && next_t0 - t0 < len)
				len = next_t0 - t0;
			if (have_slice && slice_t0 <= t0 && t0 <= slice_t1 && slice_t1 - t0 < len)
				len = slice_t1 - t0;
			d[i] = (uint16_t)len;
			have_next = true;
			next_t0 = t0;
		}
	}
}

/* Write one buffer's events, in record order. d: from post_durations, or
 * NULL (out of memory: every post slice is POST_NS long). */
static void write_buf(struct jw *w, bool *first, const struct snap *s, const uint16_t *d,
		      uint64_t base, int pid, const struct flow_map *begun,
		      const struct flow_map *ended, bool filter)
{
	const struct _kvrt_trace_rec *r = s->b->recs;
	int tid = s->b->tid;
	for (uint32_t i = 0; i < s->n; i++) {
		unsigned kind = (unsigned)(r[i].kind_id >> KIND_SHIFT);
		uint64_t id = r[i].kind_id & ID_MASK, t0 = r[i].t0;
		if (kind == REC_SLICE) {
			uint64_t t1 = r[i].v < t0 ? t0 : r[i].v, dur = t1 - t0;
			ev_head(w, first, NULL, r[i].name, "kvrt", "X", t0, base, pid, tid);
			jw_s(w, ",\"dur\":");
			jw_us(w, dur, 0);
			jw_s(w, "}");
			const char *fname = NULL;
			if (id && (!filter || flow_map_get(begun, id, &fname))) {
				/* 1 ns in: inside this slice, before anything it nests. */
				ev_head(w, first, NULL, fname ? fname : r[i].name, "kvrt.flow", "f",
					t0 + (dur >= 2 ? 1 : 0), base, pid, tid);
				jw_f(w, ",\"id\":%" PRIu64 ",\"bp\":\"e\"}", id);
			}
		} else if (kind == REC_COUNTER) {
			ev_head(w, first, NULL, r[i].name, "kvrt", "C", t0, base, pid, tid);
			jw_f(w, ",\"args\":{\"value\":%" PRId64 "}}", (int64_t)r[i].v);
		} else if (kind == REC_FLOW) {
			uint64_t len = d ? d[i] : POST_NS;
			ev_head(w, first, "post ", r[i].name, "kvrt.post", "X", t0, base, pid, tid);
			jw_s(w, ",\"dur\":");
			jw_us(w, len, 0);
			jw_s(w, "}");
			if (!filter || flow_map_get(ended, id, NULL)) {
				ev_head(w, first, NULL, r[i].name, "kvrt.flow", "s",
					t0 + (len >= 2 ? 1 : 0), base, pid, tid);
				jw_f(w, ",\"id\":%" PRIu64 "}", id);
			}
		}
	}
}

/* Drain every buffer of the current session into a JSON file at path
 * (written to path.tmp, then renamed). Under g.lock. 0 or -errno. */
static int write_trace(const char *path, uint64_t end_ns, uint64_t *dropped_out)
{
	uint32_t sess = atomic_load_explicit(&g.sess, memory_order_relaxed);
	size_t nb = 0;
	for (struct _kvrt_trace_buf *b = g.bufs; b; b = b->next)
		nb++;
	struct snap *snaps = calloc(nb ? nb : 1, sizeof *snaps);
	size_t plen = strlen(path);
	char *tmp = malloc(plen + 5);
	struct jw *w = malloc(sizeof *w);
	int rc = -ENOMEM;
	if (!snaps || !tmp || !w)
		goto out;

	/* Snapshot the counts: records past them (racing writers) are left. */
	size_t ns = 0, nflows = 0, nrecs = 0;
	uint64_t dropped = atomic_load_explicit(&g.lost, memory_order_relaxed);
	for (struct _kvrt_trace_buf *b = g.bufs; b; b = b->next) {
		/* Acquire: pairs with the owner's reset (buf_attach). */
		if (atomic_load_explicit(&b->sess, memory_order_acquire) != sess)
			continue;
		struct snap *s = &snaps[ns++];
		s->b = b;
		/* Acquire: pairs with rec_put's release; records below n are
		 * complete and never written again this session. */
		s->n = atomic_load_explicit(&b->count, memory_order_acquire);
		s->dropped = atomic_load_explicit(&b->dropped, memory_order_relaxed);
		dropped += s->dropped;
		nrecs += s->n;
		for (uint32_t i = 0; i < s->n; i++)
			nflows += (b->recs[i].kind_id & ID_MASK) != 0;
	}
	*dropped_out = dropped;

	/* Flow ids with a start, and with an end: arrows need both. */
	struct flow_map begun = {0}, ended = {0};
	bool filter = flow_map_init(&begun, nflows) == 0 && flow_map_init(&ended, nflows) == 0;
	if (filter)
		for (size_t k = 0; k < ns; k++)
			for (uint32_t i = 0; i < snaps[k].n; i++) {
				const struct _kvrt_trace_rec *r = &snaps[k].b->recs[i];
				uint64_t id = r->kind_id & ID_MASK;
				if (!id)
					continue;
				if (r->kind_id >> KIND_SHIFT == REC_FLOW)
					flow_map_put(&begun, id, r->name);
				else
					flow_map_put(&ended, id, NULL);
			}

	snprintf(tmp, plen + 5, "%s.tmp", path);
	w->fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	w->err = w->fd < 0 ? errno : 0;
	w->len = 0;
	if (w->fd >= 0) {
		int pid = getpid();
		uint64_t base = g.start_ns;
		bool first = true;
		jw_f(w, "{\"otherData\":{\"producer\":\"kvrt\",\"dropped_records\":%" PRIu64
			",\"records\":%zu,\"buffer_records\":%u,\"span_us\":",
		     dropped, nrecs, atomic_load_explicit(&g.cap, memory_order_relaxed));
		jw_us(w, end_ns, base);
		jw_s(w, "},\n\"displayTimeUnit\":\"ns\",\n\"traceEvents\":[");
		ev_head(w, &first, NULL, "process_name", NULL, "M", base, base, pid, pid);
		jw_s(w, ",\"args\":{\"name\":\"kvrt\"}}");
		for (size_t k = 0; k < ns; k++) {
			const struct snap *s = &snaps[k];
			const char *name = atomic_load_explicit(&s->b->name, memory_order_acquire);
			ev_head(w, &first, NULL, "thread_name", NULL, "M", base, base, pid, s->b->tid);
			jw_s(w, ",\"args\":{\"name\":");
			jw_str(w, NULL, name ? name : s->b->os_name[0] ? s->b->os_name : "thread");
			jw_s(w, "}}");
			if (s->dropped) {
				ev_head(w, &first, NULL, "kvrt_dropped_records", NULL, "M", base, base,
					pid, s->b->tid);
				jw_f(w, ",\"args\":{\"dropped\":%" PRIu64 "}}", s->dropped);
			}
		}
		for (size_t k = 0; k < ns; k++) {
			uint16_t *d = malloc((snaps[k].n ? snaps[k].n : 1) * sizeof *d);
			if (d)
				post_durations(&snaps[k], d);
			write_buf(w, &first, &snaps[k], d, base, pid, &begun, &ended, filter);
			free(d);
		}
		if (dropped) {
			char note[96];
			snprintf(note, sizeof note,
				 "kvrt: %" PRIu64 " trace records dropped (buffers full)", dropped);
			ev_head(w, &first, NULL, note, "kvrt", "i", end_ns, base, pid, pid);
			jw_s(w, ",\"s\":\"g\"}");
		}
		jw_s(w, "\n]}\n");
		jw_flush(w);
		if (close(w->fd) != 0 && !w->err)
			w->err = errno;
		if (!w->err && rename(tmp, path) != 0)
			w->err = errno;
		if (w->err)
			unlink(tmp);
	}
	free(begun.ids);
	free(begun.names);
	free(ended.ids);
	free(ended.names);
	rc = -w->err;
out:
	if (rc) {
		char eb[128];
		kvrt_error("trace: cannot write %s: %s", path, strerror_r(-rc, eb, sizeof eb));
	}
	free(w);
	free(tmp);
	free(snaps);
	return rc;
}

/* ---- start / stop --------------------------------------------------- */

static uint32_t cap_from_env(void)
{
	const char *s = getenv("KVRT_TRACE_BUFFER");
	if (!s || !*s)
		return DEFAULT_CAP;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *end || v < 1 || v > MAX_CAP) {
		kvrt_warn("trace: KVRT_TRACE_BUFFER=%s: want a record count per thread in [1, %u]; using %u",
			  s, MAX_CAP, DEFAULT_CAP);
		return DEFAULT_CAP;
	}
	return (uint32_t)v;
}

/* path with each "%p" replaced by the process id ("%%": a "%"), so that
 * several processes given one KVRT_TRACE (vLLM's scheduler and workers) write
 * one file each. malloc'd, or NULL. */
static char *expand_path(const char *path)
{
	char pid[24];
	int plen = snprintf(pid, sizeof pid, "%d", (int)getpid());
	size_t n = strlen(path) + 1;
	for (const char *q = path; (q = strstr(q, "%p")); q += 2)
		n += (size_t)plen;
	char *out = malloc(n), *o = out;
	if (!out)
		return NULL;
	for (const char *q = path; *q; q++) {
		if (q[0] == '%' && q[1] == 'p') {
			memcpy(o, pid, (size_t)plen);
			o += plen;
			q++;
		} else if (q[0] == '%' && q[1] == '%') {
			*o++ = '%';
			q++;
		} else {
			*o++ = *q;
		}
	}
	*o = 0;
	return out;
}

static void register_fork_handlers(void);

int kvrt_trace_start(const char *path)
{
	static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
	if (!path || !*path)
		return -EINVAL;
	pthread_once(&fork_once, register_fork_handlers);
	pthread_mutex_lock(&g.lock);
	if (g.running) {
		pthread_mutex_unlock(&g.lock);
		return -EALREADY;
	}
	char *p = expand_path(path);
	if (!p) {
		pthread_mutex_unlock(&g.lock);
		return -ENOMEM;
	}
	/* Tell now, not at exit an hour later, when the file cannot be made. */
	char *dir = strdup(p);
	if (dir) {
		const char *d = dirname(dir);
		if (access(d, W_OK | X_OK) != 0) {
			char eb[128];
			kvrt_warn("trace: %s: %s; the trace will not be written", d,
				  strerror_r(errno, eb, sizeof eb));
		}
		free(dir);
	}
	g.path = p;
	g.running = true;
	g.start_ns = kvrt_now_ns();
	atomic_store_explicit(&g.cap, cap_from_env(), memory_order_relaxed);
	/* Release: a thread that loads this session (acquire) sees the cap
	 * above and comes after the previous drain (which held g.lock). */
	atomic_store_explicit(&g.sess, atomic_load_explicit(&g.sess, memory_order_relaxed) + 1,
			      memory_order_release);
	/* Relaxed: the flag only gates work; the session load orders it. */
	__atomic_store_n(&_kvrt_trace_on, 1, __ATOMIC_RELAXED);
	kvrt_info("trace: recording to %s", p);
	pthread_mutex_unlock(&g.lock);
	return 0;
}

int kvrt_trace_stop(void)
{
	pthread_mutex_lock(&g.lock);
	if (!g.running) {
		pthread_mutex_unlock(&g.lock);
		return -EINVAL;
	}
	/* Threads past their KVRT_TRACING() check may still append; the drain
	 * takes each buffer's count once and the buffers are never freed. */
	__atomic_store_n(&_kvrt_trace_on, 0, __ATOMIC_RELAXED);
	uint64_t end_ns = kvrt_now_ns(), dropped = 0;
	int rc = write_trace(g.path, end_ns, &dropped);
	uint32_t cap = atomic_load_explicit(&g.cap, memory_order_relaxed);
	g.drained = atomic_load_explicit(&g.sess, memory_order_relaxed);
	g.running = false;
	char *path = g.path;
	g.path = NULL;
	pthread_mutex_unlock(&g.lock);
	if (dropped)
		kvrt_warn("trace: %" PRIu64 " records dropped: a thread filled its buffer of %u records "
			  "(raise KVRT_TRACE_BUFFER)", dropped, cap);
	if (rc == 0)
		kvrt_info("trace: wrote %s", path);
	free(path);
	return rc;
}

static void stop_at_exit(void)
{
	pthread_mutex_lock(&g.lock);
	bool running = g.running;
	pthread_mutex_unlock(&g.lock);
	if (running)
		kvrt_trace_stop();
}

/* kvrt_trace_init_from_env's state (not a pthread_once: a forked child
 * starts over, see on_fork_child). */
static pthread_mutex_t env_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool env_done;  /* KVRT_TRACE was looked at */
static bool exit_hook;        /* stop_at_exit registered (inherited by children) */

void kvrt_trace_init_from_env(void)
{
	/* Acquire: pairs with the release below; cheap after the first call. */
	if (atomic_load_explicit(&env_done, memory_order_acquire))
		return;
	pthread_mutex_lock(&env_lock);
	if (!atomic_load_explicit(&env_done, memory_order_relaxed)) {
		const char *path = getenv("KVRT_TRACE");
		int rc = path && *path ? kvrt_trace_start(path) : 0;
		if (rc != 0 && rc != -EALREADY) { /* already recording (a config key started it) */
			char eb[128];
			kvrt_error("trace: KVRT_TRACE=%s: cannot start (%s)", path,
				   strerror_r(-rc, eb, sizeof eb));
		} else if (path && *path && !exit_hook) {
			exit_hook = true;
			if (atexit(stop_at_exit) != 0)
				kvrt_warn("trace: cannot register the exit hook; call kvrt_trace_stop()");
		}
		atomic_store_explicit(&env_done, true, memory_order_release);
	}
	pthread_mutex_unlock(&env_lock);
}

/* fork(): the child gets copies of the buffers but not the threads that
 * filled them, and must not write the parent's file. Hold the locks across
 * fork so the child's copies are consistent; in the child, tracing is off and
 * KVRT_TRACE is looked at again (its next actor starts a session of its own:
 * use %p in the path for one file per process). */
static void on_fork_prepare(void)
{
	pthread_mutex_lock(&env_lock);
	pthread_mutex_lock(&g.lock);
	pthread_mutex_lock(&interned.lock);
}

static void on_fork_parent(void)
{
	pthread_mutex_unlock(&interned.lock);
	pthread_mutex_unlock(&g.lock);
	pthread_mutex_unlock(&env_lock);
}

static void on_fork_child(void)
{
	pthread_mutex_unlock(&interned.lock);
	__atomic_store_n(&_kvrt_trace_on, 0, __ATOMIC_RELAXED);
	if (g.running) {
		g.running = false;
		free(g.path);
		g.path = NULL;
	}
	/* Nothing of the parent's session is written by the child. */
	g.drained = atomic_load_explicit(&g.sess, memory_order_relaxed);
	pthread_mutex_unlock(&g.lock);
	atomic_store_explicit(&env_done, false, memory_order_relaxed);
	pthread_mutex_unlock(&env_lock);
}

static void register_fork_handlers(void)
{
	if (pthread_atfork(on_fork_prepare, on_fork_parent, on_fork_child) != 0)
		kvrt_warn("trace: pthread_atfork failed; a forked child may write the parent's trace");
}
