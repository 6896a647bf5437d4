/* tests/test_device.c: the device layer (kernels/device.h) on the backend
 * this machine selects: the host backend without a GPU (the test says so),
 * CUDA with one (then the memory-touching checks use pinned/device memory
 * the same way). Streams run in order, events follow CUDA's semantics,
 * waits block what they must and nothing else, callbacks post to actors
 * after the work before them, and gather/scatter through layer tables and
 * uploaded plans land byte-exact, layer by layer behind per-layer events.
 */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <libgen.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "kernels/device.h"
#include "runtime/actor.h"
#include "runtime/completion.h"
#include "tests/test_kern_util.h"

static bool have_gpu(void)
{
	return access("/dev/nvidia0", F_OK) == 0 || access("/dev/nvidiactl", F_OK) == 0;
}

static struct kvrt_device *open_dev(void)
{
	struct kvrt_device *d;
	cr_assert_eq(kvrt_device_open(&d, 0), 0);
	return d;
}

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
	nanosleep(&ts, NULL);
}

/* --- selection ---------------------------------------------------------------- */

Test(device, selects_host_backend_without_gpu)
{
	unsetenv("KVRT_DEVICE");
	struct kvrt_device *d = open_dev();
	if (have_gpu()) {
		cr_assert_eq(kvrt_device_kind(d), KVRT_DEVICE_CUDA, "a GPU is present: %s",
			     kvrt_device_name(d));
	} else {
		cr_assert_eq(kvrt_device_kind(d), KVRT_DEVICE_HOST,
			     "no GPU here, yet the backend is %s", kvrt_device_name(d));
		cr_assert_str_eq(kvrt_device_name(d), "host");
	}
	cr_assert_not_null(kvrt_device_load_stream(d));
	cr_assert_not_null(kvrt_device_save_stream(d));
	cr_assert_neq(kvrt_device_load_stream(d), kvrt_device_save_stream(d));
	kvrt_device_close(d);
}

Test(device, kvrt_device_env)
{
	struct kvrt_device *d;
	setenv("KVRT_DEVICE", "host", 1);
	cr_assert_eq(kvrt_device_open(&d, 0), 0);
	cr_assert_eq(kvrt_device_kind(d), KVRT_DEVICE_HOST, "KVRT_DEVICE=host forces the host");
	kvrt_device_close(d);
	setenv("KVRT_DEVICE", "gpu", 1);
	cr_assert_eq(kvrt_device_open(&d, 0), -EINVAL, "unknown value refused");
	cr_assert_null(d);
	if (!have_gpu()) {
		setenv("KVRT_DEVICE", "cuda", 1);
		cr_assert_eq(kvrt_device_open(&d, 0), -ENODEV, "cuda demanded, none here");
	}
	unsetenv("KVRT_DEVICE");
	cr_assert_eq(kvrt_device_open(&d, -1), -ENODEV);
}

/* The shared library (with the CUDA runtime linked in statically, in the
 * plain build) loads on a machine without a driver. */
Test(device, shared_library_loads)
{
	char exe[4096];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	cr_assert_gt(n, 0);
	exe[n] = 0;
	char path[4200];
	snprintf(path, sizeof(path), "%s/../libkvrt.so", dirname(exe));
	if (access(path, F_OK) != 0)
		cr_skip_test("%s not built", path);
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	cr_assert_not_null(h, "dlopen %s: %s", path, dlerror());
	dlclose(h);
}

/* --- streams ------------------------------------------------------------------ */

struct seq_log {
	_Atomic uint32_t n;
	uint32_t v[4096];
};

struct seq_arg {
	struct seq_log *log;
	uint32_t id;
};

static void log_fn(void *p)
{
	struct seq_arg *a = p;
	uint32_t i = atomic_fetch_add(&a->log->n, 1);
	if (i < 4096)
		a->log->v[i] = a->id;
}

Test(device, stream_runs_in_order)
{
	struct kvrt_device *d = open_dev();
	struct kvrt_stream *s;
	cr_assert_eq(kvrt_stream_create(d, "t-order", &s), 0);
	static struct seq_log log;
	static struct seq_arg args[3000];
	uint32_t n = (uint32_t)kvrt_test_scaled(3000, 300);
	/* A chain of copies through pinned buffers: each reads the last's output. */
	unsigned char *buf[4];
	uint64_t rng = 5;
	for (int i = 0; i < 4; i++)
		cr_assert_eq(kvrt_device_alloc_pinned(d, 4096, (void **)&buf[i]), 0);
	kt_fill(buf[0], 4096, &rng);
	for (int i = 1; i < 4; i++)
		memset(buf[i], 0x5A, 4096);
	for (uint32_t i = 0; i < n; i++) {
		args[i] = (struct seq_arg){&log, i};
		cr_assert_eq(kvrt_stream_host_fn(s, log_fn, &args[i]), 0);
		if (i == n / 2) {
			cr_assert_eq(kvrt_stream_memcpy(s, buf[1], buf[0], 4096), 0);
			cr_assert_eq(kvrt_stream_memcpy(s, buf[2], buf[1], 4096), 0);
			cr_assert_eq(kvrt_stream_memcpy(s, buf[3], buf[2], 4096), 0);
		}
	}
	cr_assert_eq(kvrt_stream_sync(s), 0);
	cr_assert_eq(atomic_load(&log.n), n);
	for (uint32_t i = 0; i < n; i++)
		cr_assert_eq(log.v[i], i, "callback %u ran at position %u", log.v[i], i);
	cr_assert(memcmp(buf[3], buf[0], 4096) == 0, "chained copies ran in order");
	for (int i = 0; i < 4; i++)
		kvrt_device_free_pinned(d, buf[i]);
	kvrt_stream_destroy(s);
	kvrt_device_close(d);
}

/* A gate holds a stream at a point until the test opens it. */
struct gate {
	_Atomic int open;
	_Atomic int reached;
};

static void gate_fn(void *p)
{
	struct gate *g = p;
	atomic_store(&g->reached, 1);
	while (!atomic_load(&g->open))
		sleep_ms(1);
}

static void flag_fn(void *p)
{
	atomic_store((_Atomic int *)p, 1);
}

Test(device, event_semantics)
{
	struct kvrt_device *d = open_dev();
	struct kvrt_stream *s = kvrt_device_load_stream(d);
	struct kvrt_event *e;
	cr_assert_eq(kvrt_event_create(d, &e), 0);
	cr_assert_eq(kvrt_event_query(e), 0, "never recorded counts as complete");
	cr_assert_eq(kvrt_event_wait(e, 0), 0);
	static struct gate g;
	cr_assert_eq(kvrt_stream_host_fn(s, gate_fn, &g), 0);
	cr_assert_eq(kvrt_event_record(e, s), 0);
	cr_assert_eq(kvrt_event_query(e), -EBUSY);
	uint64_t t0 = kvrt_now_ns();
	cr_assert_eq(kvrt_event_wait(e, 20000000), -ETIMEDOUT);
	cr_assert_geq(kvrt_now_ns() - t0, 19000000ull, "the timeout was honoured");
	atomic_store(&g.open, 1);
	cr_assert_eq(kvrt_event_wait(e, UINT64_MAX), 0);
	cr_assert_eq(kvrt_event_query(e), 0);
	/* Re-recording: query follows the most recent record. */
	atomic_store(&g.open, 0);
	atomic_store(&g.reached, 0);
	cr_assert_eq(kvrt_stream_host_fn(s, gate_fn, &g), 0);
	cr_assert_eq(kvrt_event_record(e, s), 0);
	cr_assert_eq(kvrt_event_query(e), -EBUSY);
	atomic_store(&g.open, 1);
	cr_assert_eq(kvrt_event_wait(e, UINT64_MAX), 0);
	kvrt_event_destroy(e);
	kvrt_device_close(d);
}

Test(device, stream_waits_for_event_of_other_stream)
{
	struct kvrt_device *d = open_dev();
	struct kvrt_stream *a = kvrt_device_load_stream(d), *b = kvrt_device_save_stream(d);
	struct kvrt_event *e;
	cr_assert_eq(kvrt_event_create(d, &e), 0);
	static struct gate g;
	static _Atomic int after_wait, unrelated;
	cr_assert_eq(kvrt_stream_host_fn(a, gate_fn, &g), 0);
	cr_assert_eq(kvrt_event_record(e, a), 0);
	cr_assert_eq(kvrt_stream_wait_event(b, e), 0);
	cr_assert_eq(kvrt_stream_host_fn(b, flag_fn, (void *)&after_wait), 0);
	struct kvrt_stream *c;
	cr_assert_eq(kvrt_stream_create(d, "t-free", &c), 0);
	cr_assert_eq(kvrt_stream_host_fn(c, flag_fn, (void *)&unrelated), 0);
	cr_assert_eq(kvrt_stream_sync(c), 0);
	cr_assert_eq(atomic_load(&unrelated), 1, "a stream that did not wait runs");
	sleep_ms(30);
	cr_assert_eq(atomic_load(&after_wait), 0, "b ran past its wait before a's record");
	atomic_store(&g.open, 1);
	cr_assert_eq(kvrt_stream_sync(b), 0);
	cr_assert_eq(atomic_load(&after_wait), 1);
	/* A wait on an event recorded later does not apply (capture at call). */
	atomic_store(&g.open, 0);
	static _Atomic int second;
	struct kvrt_event *e2;
	cr_assert_eq(kvrt_event_create(d, &e2), 0);
	cr_assert_eq(kvrt_stream_wait_event(b, e2), 0); /* never recorded: no wait */
	cr_assert_eq(kvrt_stream_host_fn(b, flag_fn, (void *)&second), 0);
	cr_assert_eq(kvrt_stream_sync(b), 0);
	cr_assert_eq(atomic_load(&second), 1);
	kvrt_event_destroy(e2);
	kvrt_stream_destroy(c);
	kvrt_event_destroy(e);
	kvrt_device_close(d);
}

static void *open_gate_later(void *p)
{
	sleep_ms(30);
	atomic_store(&((struct gate *)p)->open, 1);
	return NULL;
}

Test(device, caller_stream_waits_on_cpu)
{
	struct kvrt_device *d = open_dev();
	if (kvrt_device_kind(d) != KVRT_DEVICE_HOST) {
		kvrt_device_close(d);
		cr_skip_test("caller-thread streams are the host backend's");
	}
	struct kvrt_stream *caller, *bad;
	cr_assert_eq(kvrt_stream_wrap(d, (void *)0x1, &bad), -EINVAL);
	cr_assert_eq(kvrt_stream_wrap(d, NULL, &caller), 0);
	struct kvrt_stream *s = kvrt_device_load_stream(d);
	struct kvrt_event *e;
	cr_assert_eq(kvrt_event_create(d, &e), 0);
	static struct gate g;
	cr_assert_eq(kvrt_stream_host_fn(s, gate_fn, &g), 0);
	cr_assert_eq(kvrt_event_record(e, s), 0);
	pthread_t th;
	uint64_t t0 = kvrt_now_ns(); /* before the thread: it sleeps >= 30 ms after */
	cr_assert_eq(pthread_create(&th, NULL, open_gate_later, &g), 0);
	cr_assert_eq(kvrt_stream_wait_event(caller, e), 0);
	cr_assert_eq(atomic_load(&g.open), 1, "the caller's wait returned before the work");
	cr_assert_geq(kvrt_now_ns() - t0, 20000000ull);
	/* Work on the caller stream runs inline. */
	static _Atomic int ran;
	cr_assert_eq(kvrt_stream_host_fn(caller, flag_fn, (void *)&ran), 0);
	cr_assert_eq(atomic_load(&ran), 1);
	pthread_join(th, NULL);
	kvrt_event_destroy(e);
	kvrt_stream_destroy(caller);
	kvrt_device_close(d);
}

struct bp_arg {
	struct kvrt_stream *s;
	_Atomic uint32_t *count;
	uint32_t n;
	_Atomic int done;
};

static void count_fn(void *p)
{
	atomic_fetch_add((_Atomic uint32_t *)p, 1);
}

static void *enqueue_many(void *p)
{
	struct bp_arg *a = p;
	for (uint32_t i = 0; i < a->n; i++)
		kvrt_stream_host_fn(a->s, count_fn, (void *)a->count);
	atomic_store(&a->done, 1);
	return NULL;
}

Test(device, full_stream_blocks_producer)
{
	struct kvrt_device *d = open_dev();
	if (kvrt_device_kind(d) != KVRT_DEVICE_HOST) {
		kvrt_device_close(d);
		cr_skip_test("host backend queue");
	}
	struct kvrt_stream *s = kvrt_device_load_stream(d);
	static struct gate g;
	static _Atomic uint32_t count;
	cr_assert_eq(kvrt_stream_host_fn(s, gate_fn, &g), 0);
	struct bp_arg a = {.s = s, .count = &count, .n = 3000};
	pthread_t th;
	cr_assert_eq(pthread_create(&th, NULL, enqueue_many, &a), 0);
	sleep_ms(30);
	cr_assert_eq(atomic_load(&a.done), 0, "3000 operations fit a 1024-deep queue?");
	cr_assert_eq(atomic_load(&count), 0);
	atomic_store(&g.open, 1);
	pthread_join(th, NULL);
	cr_assert_eq(kvrt_stream_sync(s), 0);
	cr_assert_eq(atomic_load(&count), 3000);
	kvrt_device_close(d);
}

/* --- posting to an actor ---------------------------------------------------------- */

struct post_state {
	unsigned char *src, *dst; /* the stream copied src -> dst before the post */
};

static void post_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct post_state *st = kvrt_actor_data(a);
	if (m->reply) {
		m->reply->value[0] = m->arg.u64[0];
		m->reply->value[1] = memcmp(st->src, st->dst, 65536) == 0;
		kvrt_completion_signal(m->reply, 0);
	}
}

Test(device, post_reaches_actor_after_work)
{
	struct kvrt_device *d = open_dev();
	struct kvrt_stream *s = kvrt_device_save_stream(d);
	struct post_state st;
	uint64_t rng = 99;
	cr_assert_eq(kvrt_device_alloc_pinned(d, 65536, (void **)&st.src), 0);
	cr_assert_eq(kvrt_device_alloc_pinned(d, 65536, (void **)&st.dst), 0);
	kt_fill(st.src, 65536, &rng);
	memset(st.dst, 0x5A, 65536);
	static const struct kvrt_actor_ops ops = {.handle = post_handle};
	struct kvrt_actor *a;
	cr_assert_eq(kvrt_actor_create(&a, &(struct kvrt_actor_config){
		.name = "t-post", .mailbox_size = 16, .ops = &ops, .data = &st}), 0);
	static struct gate g;
	cr_assert_eq(kvrt_stream_host_fn(s, gate_fn, &g), 0);
	cr_assert_eq(kvrt_stream_memcpy(s, st.dst, st.src, 65536), 0);
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	struct kvrt_stream_post p = {.actor = a, .msg = {.type = 1, .reply = &c, .arg.u64 = {4242}}};
	cr_assert_eq(kvrt_stream_post(s, &p), 0);
	cr_assert_eq(kvrt_completion_wait(&c, 20000000), -ETIMEDOUT, "posted before the work ran");
	atomic_store(&g.open, 1);
	cr_assert_eq(kvrt_completion_wait(&c, 10000000000ull), 0);
	cr_assert_eq(c.value[0], 4242);
	cr_assert_eq(c.value[1], 1, "the actor saw the copy that preceded the post");
	cr_assert_eq(kvrt_device_post_failures(d), 0);
	kvrt_actor_destroy(a);
	kvrt_device_free_pinned(d, st.src);
	kvrt_device_free_pinned(d, st.dst);
	kvrt_device_close(d);
}

/* --- gather / scatter ---------------------------------------------------------------- */

struct dev_case {
	struct kvrt_device *d;
	struct kt_model m;       /* tensors in device memory */
	struct kt_model hm;      /* host images of them */
	struct kvrt_kv_set *set; /* over the device tensors */
	struct kvrt_device_layers *L;
	struct kvrt_device_plan *p;
	struct kt_chunks c;
	unsigned char **chunk;   /* pinned chunks */
	unsigned char **want;    /* reference chunk images */
};

static void dev_case_init(struct dev_case *x, struct kvrt_device *d, const struct kt_spec *s,
			  uint64_t seed)
{
	uint64_t rng = seed;
	x->d = d;
	kt_model_init(&x->m, s);
	kt_model_init(&x->hm, s);
	struct kvrt_stream *ls = kvrt_device_load_stream(d);
	for (uint32_t i = 0; i < x->m.ntensors; i++) {
		cr_assert_eq(kvrt_device_alloc(d, x->m.bytes, (void **)&x->m.base[i]), 0);
		cr_assert_eq(kvrt_device_alloc_pinned(d, x->m.bytes, (void **)&x->hm.base[i]), 0);
		kt_fill(x->hm.base[i], x->m.bytes, &rng);
		cr_assert_eq(kvrt_stream_memcpy(ls, x->m.base[i], x->hm.base[i], x->m.bytes), 0);
	}
	cr_assert_eq(kvrt_stream_sync(ls), 0);
	kt_model_bind(&x->m);
	kt_model_bind(&x->hm);
	cr_assert_eq(kvrt_kv_set_create(&x->set, x->m.t, x->m.ntensors), 0);
	cr_assert_eq(kvrt_device_layers_create(d, x->set, &x->L), 0);
	kt_chunks_init(&x->c, 6, 3 * s->bs, x->set, s->nb, s->bs, &rng);
	cr_assert_eq(kvrt_device_plan_create(d, x->set, x->c.total + 4, &x->p), 0);
	x->chunk = calloc(x->c.num, sizeof(*x->chunk));
	x->want = calloc(x->c.num, sizeof(*x->want));
	for (uint32_t i = 0; i < x->c.num; i++) {
		cr_assert_eq(kvrt_device_alloc_pinned(d, x->c.bytes[i], (void **)&x->chunk[i]), 0);
		x->want[i] = malloc(x->c.bytes[i]);
		memset(x->chunk[i], 0xA7, x->c.bytes[i]);
		memset(x->want[i], 0xA7, x->c.bytes[i]);
	}
}

static void dev_case_plan(struct dev_case *x, struct kvrt_stream *s)
{
	cr_assert_eq(kvrt_device_plan_reset(x->p), 0);
	for (uint32_t i = 0; i < x->c.num; i++) {
		void *dp;
		cr_assert_eq(kvrt_device_map_host(x->d, x->chunk[i], &dp), 0);
		cr_assert_eq(kvrt_device_plan_add(x->p, dp, x->c.n[i], x->c.first[i], x->c.count[i],
						  x->c.slots + x->c.slot_off[i]),
			     0);
	}
	cr_assert_eq(kvrt_device_plan_upload(x->p, s), 0);
}

static void dev_case_fini(struct dev_case *x)
{
	for (uint32_t i = 0; i < x->c.num; i++) {
		kvrt_device_free_pinned(x->d, x->chunk[i]);
		free(x->want[i]);
	}
	free(x->chunk);
	free(x->want);
	for (uint32_t i = 0; i < x->m.ntensors; i++) {
		kvrt_device_free(x->d, x->m.base[i]);
		kvrt_device_free_pinned(x->d, x->hm.base[i]);
	}
	kvrt_device_plan_destroy(x->p);
	kvrt_device_layers_destroy(x->L);
	kvrt_kv_set_destroy(x->set);
	kt_chunks_fini(&x->c);
	kt_model_fini(&x->m);
	kt_model_fini(&x->hm);
}

/* The save path then the load path, as the actors will run them. */
static void run_dev_case(struct kvrt_device *d, const struct kt_spec *s, uint64_t seed)
{
	char name[160];
	kt_spec_name(s, name, sizeof(name));
	struct dev_case x;
	dev_case_init(&x, d, s, seed);
	uint32_t L = x.set->num_layers;
	struct kvrt_stream *ss = kvrt_device_save_stream(d), *ls = kvrt_device_load_stream(d);
	struct kvrt_event **ev = calloc(L, sizeof(*ev));
	for (uint32_t l = 0; l < L; l++)
		cr_assert_eq(kvrt_event_create(d, &ev[l]), 0);

	/* Save: one gather of all layers in one launch. */
	dev_case_plan(&x, ss);
	cr_assert_eq(kvrt_device_gather(ss, x.L, x.p, 0, L), 0);
	cr_assert_eq(kvrt_event_record(ev[L - 1], ss), 0);
	cr_assert_eq(kvrt_event_wait(ev[L - 1], UINT64_MAX), 0);
	kt_reference(&x.hm, &x.c, x.want, 0, L, true);
	for (uint32_t i = 0; i < x.c.num; i++)
		cr_assert(memcmp(x.chunk[i], x.want[i], x.c.bytes[i]) == 0, "%s: gather chunk %u", name, i);

	/* Load into fresh random tensors: one scatter and one event per layer;
	 * the consumer checks layer l once event l completes. */
	uint64_t rng = seed ^ 0x9E3779B97F4A7C15ull;
	for (uint32_t i = 0; i < x.m.ntensors; i++) {
		kt_fill(x.hm.base[i], x.m.bytes, &rng);
		cr_assert_eq(kvrt_stream_memcpy(ls, x.m.base[i], x.hm.base[i], x.m.bytes), 0);
	}
	cr_assert_eq(kvrt_stream_sync(ls), 0); /* the host images change below */
	dev_case_plan(&x, ls);
	for (uint32_t l = 0; l < L; l++) {
		cr_assert_eq(kvrt_device_scatter(ls, x.L, x.p, l, 1), 0);
		cr_assert_eq(kvrt_event_record(ev[l], ls), 0);
	}
	kt_reference(&x.hm, &x.c, x.chunk, 0, L, false); /* expected tensors, on the host images */
	unsigned char *back = malloc(x.m.bytes);
	struct kvrt_stream *cs;
	cr_assert_eq(kvrt_stream_create(d, "t-compute", &cs), 0);
	for (uint32_t l = 0; l < L; l++) {
		cr_assert_eq(kvrt_stream_wait_event(cs, ev[l]), 0);
		if (s->cross) {
			/* Layers after l are still being written: read back only
			 * layer l's planned heads (reading more would race). */
			for (int pass = 0; pass < 2; pass++) {
				for (uint32_t i = 0; i < x.c.num; i++)
					for (uint32_t j = 0; j < x.c.count[i]; j++) {
						int64_t slot = x.c.slots[x.c.slot_off[i] + j];
						if (slot < 0)
							continue;
						for (uint32_t kv = 0; kv < x.set->geom.num_kv; kv++)
							for (uint32_t h = 0; h < x.set->geom.num_heads; h++) {
								size_t off = (size_t)(kt_at(&x.hm, l, kv, slot, h) -
										      x.hm.base[0]);
								if (pass == 0) {
									cr_assert_eq(kvrt_stream_memcpy(
										cs, back + off, x.m.base[0] + off,
										x.set->geom.head_bytes), 0);
									continue;
								}
								cr_assert(memcmp(back + off, x.hm.base[0] + off,
										 x.set->geom.head_bytes) == 0,
									  "%s: layer %u slot %lld", name, l,
									  (long long)slot);
							}
					}
				if (pass == 0)
					cr_assert_eq(kvrt_stream_sync(cs), 0);
			}
		} else {
			cr_assert_eq(kvrt_stream_memcpy(cs, back, x.m.base[l], x.m.bytes), 0);
			cr_assert_eq(kvrt_stream_sync(cs), 0);
			cr_assert(memcmp(back, x.hm.base[l], x.m.bytes) == 0,
				  "%s: layer %u after its event", name, l);
		}
	}
	cr_assert_eq(kvrt_stream_sync(ls), 0);
	if (s->cross) {
		cr_assert_eq(kvrt_stream_memcpy(cs, back, x.m.base[0], x.m.bytes), 0);
		cr_assert_eq(kvrt_stream_sync(cs), 0);
		cr_assert(memcmp(back, x.hm.base[0], x.m.bytes) == 0, "%s: whole tensor", name);
	}
	free(back);
	kvrt_stream_destroy(cs);
	for (uint32_t l = 0; l < L; l++)
		kvrt_event_destroy(ev[l]);
	free(ev);
	dev_case_fini(&x);
}

Test(device, gather_then_layerwise_scatter_every_layout)
{
	struct kvrt_device *d = open_dev();
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	/* Under the sanitizers (scale < 1) every third spec. */
	uint32_t step = kvrt_test_scaled(100, 1) < 50 ? 3 : 1;
	for (uint32_t i = 0; i < n; i += step)
		run_dev_case(d, &specs[i], 500 + i);
	kvrt_device_close(d);
}

Test(device, plan_misuse_is_refused)
{
	struct kvrt_device *d = open_dev();
	struct kt_spec s = {.layout = KVRT_KV_FLASH_ATTN, .layers = 2, .nb = 64, .bs = 4, .heads = 2,
			    .hs = 8, .elem = 2};
	struct dev_case x;
	dev_case_init(&x, d, &s, 11);
	struct kvrt_stream *ls = kvrt_device_load_stream(d);
	int64_t slots[2] = {1, 2};
	cr_assert_eq(kvrt_device_plan_add(x.p, x.chunk[0], x.c.n[0], 0, 1, slots), 0);
	cr_assert_eq(kvrt_device_scatter(ls, x.L, x.p, 0, 1), -EINVAL, "not uploaded");
	cr_assert_eq(kvrt_device_plan_upload(x.p, ls), 0);
	cr_assert_eq(kvrt_device_scatter(ls, x.L, x.p, 0, 3), -EINVAL, "layers past the set");
	cr_assert_eq(kvrt_device_scatter(ls, x.L, x.p, 2, 1), -EINVAL);
	cr_assert_eq(kvrt_device_scatter(ls, x.L, x.p, 0, 0), -EINVAL);
	cr_assert_eq(kvrt_device_scatter(ls, x.L, x.p, 0, 2), 0);
	cr_assert_eq(kvrt_device_plan_add(x.p, x.chunk[0], x.c.n[0], 0, 1, slots + 1), 0);
	cr_assert_eq(kvrt_device_gather(ls, x.L, x.p, 0, 2), -EINVAL, "changed since upload");
	int64_t bad[1] = {(int64_t)s.nb * s.bs};
	cr_assert_eq(kvrt_device_plan_add(x.p, x.chunk[0], x.c.n[0], 0, 1, bad), -EINVAL);
	cr_assert_eq(kvrt_device_plan_tokens(x.p), 2);
	cr_assert_eq(kvrt_device_plan_reset(x.p), 0);
	cr_assert_eq(kvrt_device_plan_tokens(x.p), 0);
	/* Another device's stream. */
	struct kvrt_device *d2 = open_dev();
	cr_assert_eq(kvrt_device_plan_upload(x.p, kvrt_device_load_stream(d2)), -EINVAL);
	cr_assert_eq(kvrt_device_plan_upload(x.p, ls), 0);
	cr_assert_eq(kvrt_device_gather(kvrt_device_load_stream(d2), x.L, x.p, 0, 1), -EINVAL);
	cr_assert_eq(kvrt_stream_sync(ls), 0);
	kvrt_device_close(d2);
	dev_case_fini(&x);
	kvrt_device_close(d);
}

/* Two threads drive one stream while a third waits on their events. */
struct drv_arg {
	struct kvrt_stream *s;
	struct kvrt_event *e;
	unsigned char *src, *dst;
	uint32_t rounds;
};

static void *drive(void *p)
{
	struct drv_arg *a = p;
	for (uint32_t r = 0; r < a->rounds; r++) {
		a->src[0] = (unsigned char)r;
		if (kvrt_stream_memcpy(a->s, a->dst, a->src, 4096) || kvrt_event_record(a->e, a->s) ||
		    kvrt_event_wait(a->e, UINT64_MAX) || a->dst[0] != (unsigned char)r)
			return (void *)1;
	}
	return NULL;
}

Test(device, threads_share_a_stream)
{
	struct kvrt_device *d = open_dev();
	struct drv_arg a[2];
	pthread_t th[2];
	uint64_t rng = 3;
	for (int i = 0; i < 2; i++) {
		a[i].s = kvrt_device_load_stream(d);
		cr_assert_eq(kvrt_event_create(d, &a[i].e), 0);
		cr_assert_eq(kvrt_device_alloc_pinned(d, 4096, (void **)&a[i].src), 0);
		cr_assert_eq(kvrt_device_alloc_pinned(d, 4096, (void **)&a[i].dst), 0);
		kt_fill(a[i].src, 4096, &rng);
		a[i].rounds = (uint32_t)kvrt_test_scaled(2000, 100);
		cr_assert_eq(pthread_create(&th[i], NULL, drive, &a[i]), 0);
	}
	for (int i = 0; i < 2; i++) {
		void *r;
		pthread_join(th[i], &r);
		cr_assert_null(r, "thread %d saw a stale copy", i);
		cr_assert(memcmp(a[i].src, a[i].dst, 4096) == 0);
		kvrt_event_destroy(a[i].e);
		kvrt_device_free_pinned(d, a[i].src);
		kvrt_device_free_pinned(d, a[i].dst);
	}
	kvrt_device_close(d);
}

/* Destroying an event whose record and waits are still queued is safe
 * (ASan checks the memory), and the waits still hold back their stream. */
Test(device, destroy_event_with_queued_record_and_wait)
{
	struct kvrt_device *d = open_dev();
	struct kvrt_stream *a = kvrt_device_load_stream(d), *b = kvrt_device_save_stream(d);
	struct kvrt_event *e;
	cr_assert_eq(kvrt_event_create(d, &e), 0);
	static struct gate g;
	static _Atomic int after;
	cr_assert_eq(kvrt_stream_host_fn(a, gate_fn, &g), 0);
	cr_assert_eq(kvrt_event_record(e, a), 0);
	cr_assert_eq(kvrt_stream_wait_event(b, e), 0);
	cr_assert_eq(kvrt_stream_host_fn(b, flag_fn, (void *)&after), 0);
	kvrt_event_destroy(e);
	sleep_ms(20);
	cr_assert_eq(atomic_load(&after), 0, "the wait outlived its event's handle");
	atomic_store(&g.open, 1);
	cr_assert_eq(kvrt_stream_sync(b), 0);
	cr_assert_eq(kvrt_stream_sync(a), 0);
	cr_assert_eq(atomic_load(&after), 1);
	kvrt_device_close(d);
}
