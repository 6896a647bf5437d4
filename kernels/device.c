/* kernels/device.c: the device layer's front (see device.h): picks a backend,
 * checks arguments, dispatches; owns the layer tables and plans, which are
 * built from the backends' own memory and copy calls (so the host backend
 * runs the same upload path as CUDA). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/device.h"
#include "kernels/device_impl.h"
#include "runtime/log.h"

/* --- logging for C++ backends -------------------------------------------- */

void _kvrt_device_log_error(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	kvrt_error("%s", msg);
}

void _kvrt_device_log_info(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	kvrt_info("%s", msg);
}

/* --- devices -------------------------------------------------------------- */

static int _stream_new(struct kvrt_device *d, const char *name, void *native, bool wrap,
		       struct kvrt_stream **out)
{
	struct kvrt_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->dev = d;
	s->wrapped = wrap;
	snprintf(s->name, sizeof(s->name), "%s", name ? name : "kvrt-stream");
	int rc = d->ops->stream_create(s, native, wrap);
	if (rc < 0) {
		free(s);
		return rc;
	}
	*out = s;
	return 0;
}

int kvrt_device_open(struct kvrt_device **out, int ordinal)
{
	*out = NULL;
	const char *want = getenv("KVRT_DEVICE");
	if (want && *want && strcmp(want, "auto") && strcmp(want, "host") && strcmp(want, "cuda")) {
		kvrt_error("kernels: KVRT_DEVICE=%s (accepted: auto, host, cuda)", want);
		return -EINVAL;
	}
	if (ordinal < 0)
		return -ENODEV;
	const struct _kvrt_device_ops *ops = &_kvrt_device_host_ops;
	if (!want || strcmp(want, "host")) {
		const struct _kvrt_device_ops *cuda = NULL;
		int count = 0;
		int rc = _kvrt_device_cuda_probe(&cuda, &count);
		if (rc == 0 && ordinal >= count) {
			kvrt_error("kernels: CUDA device %d asked for, %d present", ordinal, count);
			return -ENODEV;
		}
		if (rc == 0) {
			ops = cuda;
		} else if (want && !strcmp(want, "cuda")) {
			kvrt_error("kernels: KVRT_DEVICE=cuda but no usable CUDA device (%d)", rc);
			return -ENODEV;
		} else {
			kvrt_info("kernels: no usable CUDA device; using the host backend");
		}
	}
	struct kvrt_device *d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->ops = ops;
	d->ordinal = ordinal;
	d->kind = ops == &_kvrt_device_host_ops ? KVRT_DEVICE_HOST : KVRT_DEVICE_CUDA;
	int rc = ops->open(d);
	if (rc < 0)
		goto err_free;
	if ((rc = _stream_new(d, "kvrt-load", NULL, false, &d->load)) < 0)
		goto err_close;
	if ((rc = _stream_new(d, "kvrt-save", NULL, false, &d->save)) < 0)
		goto err_load;
	kvrt_info("kernels: device %s", d->name);
	*out = d;
	return 0;
err_load:
	kvrt_stream_destroy(d->load);
err_close:
	ops->close(d);
err_free:
	free(d);
	return rc;
}

void kvrt_device_close(struct kvrt_device *d)
{
	if (!d)
		return;
	kvrt_stream_destroy(d->save);
	kvrt_stream_destroy(d->load);
	d->ops->close(d);
	free(d);
}

enum kvrt_device_kind kvrt_device_kind(const struct kvrt_device *d)
{
	return (enum kvrt_device_kind)d->kind;
}

const char *kvrt_device_name(const struct kvrt_device *d)
{
	return d->name;
}

struct kvrt_stream *kvrt_device_load_stream(struct kvrt_device *d)
{
	return d->load;
}

struct kvrt_stream *kvrt_device_save_stream(struct kvrt_device *d)
{
	return d->save;
}

uint64_t kvrt_device_post_failures(const struct kvrt_device *d)
{
	return __atomic_load_n(&d->post_failures, __ATOMIC_RELAXED);
}

/* --- memory ---------------------------------------------------------------- */

int kvrt_device_alloc(struct kvrt_device *d, size_t n, void **out)
{
	*out = NULL;
	return n ? d->ops->alloc(d, n, out) : -EINVAL;
}

void kvrt_device_free(struct kvrt_device *d, void *p)
{
	if (p)
		d->ops->free(d, p);
}

int kvrt_device_alloc_pinned(struct kvrt_device *d, size_t n, void **out)
{
	*out = NULL;
	return n ? d->ops->alloc_pinned(d, n, out) : -EINVAL;
}

void kvrt_device_free_pinned(struct kvrt_device *d, void *p)
{
	if (p)
		d->ops->free_pinned(d, p);
}

int kvrt_device_register(struct kvrt_device *d, void *p, size_t n)
{
	return p && n ? d->ops->host_register(d, p, n) : -EINVAL;
}

int kvrt_device_unregister(struct kvrt_device *d, void *p)
{
	return p ? d->ops->host_unregister(d, p) : -EINVAL;
}

int kvrt_device_map_host(struct kvrt_device *d, void *host, void **dev_ptr)
{
	*dev_ptr = NULL;
	return host ? d->ops->map_host(d, host, dev_ptr) : -EINVAL;
}

/* --- streams ----------------------------------------------------------------- */

int kvrt_stream_create(struct kvrt_device *d, const char *name, struct kvrt_stream **out)
{
	*out = NULL;
	return _stream_new(d, name, NULL, false, out);
}

int kvrt_stream_wrap(struct kvrt_device *d, void *native, struct kvrt_stream **out)
{
	*out = NULL;
	if (d->kind == KVRT_DEVICE_HOST && native)
		return -EINVAL;
	return _stream_new(d, "caller", native, true, out);
}

void kvrt_stream_destroy(struct kvrt_stream *s)
{
	if (!s)
		return;
	s->dev->ops->stream_destroy(s);
	free(s);
}

int kvrt_stream_sync(struct kvrt_stream *s)
{
	return s->dev->ops->stream_sync(s);
}

int kvrt_stream_wait_event(struct kvrt_stream *s, struct kvrt_event *e)
{
	if (e->dev != s->dev)
		return -EINVAL;
	return s->dev->ops->stream_wait_event(s, e);
}

int kvrt_stream_memcpy(struct kvrt_stream *s, void *dst, const void *src, size_t n)
{
	if (n == 0)
		return 0;
	if (!dst || !src)
		return -EINVAL;
	return s->dev->ops->memcpy_async(s, dst, src, n);
}

int kvrt_stream_host_fn(struct kvrt_stream *s, void (*fn)(void *arg), void *arg)
{
	return fn ? s->dev->ops->host_fn(s, fn, arg) : -EINVAL;
}

void _kvrt_device_post_run(void *arg)
{
	struct kvrt_stream_post *p = arg;
	/* Read what we need before posting: once posted, the owner may reuse p. */
	struct kvrt_device *dev = p->dev;
	struct kvrt_actor *a = p->actor;
	struct kvrt_msg m = p->msg;
	if (kvrt_actor_try_post(a, &m))
		return;
	int rc = kvrt_actor_post(a, &m, 1000000000ull);
	if (rc == 0)
		return;
	__atomic_fetch_add(&dev->post_failures, 1, __ATOMIC_RELAXED);
	kvrt_error("kernels: stream callback could not post message type %u to actor %s: %d",
		   m.type, kvrt_actor_name(a), rc);
}

int kvrt_stream_post(struct kvrt_stream *s, struct kvrt_stream_post *p)
{
	if (!p || !p->actor)
		return -EINVAL;
	p->dev = s->dev;
	return s->dev->ops->host_fn(s, _kvrt_device_post_run, p);
}

/* --- events ------------------------------------------------------------------ */

int kvrt_event_create(struct kvrt_device *d, struct kvrt_event **out)
{
	*out = NULL;
	struct kvrt_event *e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->dev = d;
	int rc = d->ops->event_create(e);
	if (rc < 0) {
		free(e);
		return rc;
	}
	*out = e;
	return 0;
}

void kvrt_event_destroy(struct kvrt_event *e)
{
	if (!e)
		return;
	e->dev->ops->event_destroy(e);
	free(e);
}

int kvrt_event_record(struct kvrt_event *e, struct kvrt_stream *s)
{
	if (e->dev != s->dev)
		return -EINVAL;
	return s->dev->ops->event_record(e, s);
}

int kvrt_event_query(struct kvrt_event *e)
{
	return e->dev->ops->event_query(e);
}

int kvrt_event_wait(struct kvrt_event *e, uint64_t timeout_ns)
{
	return e->dev->ops->event_wait(e, timeout_ns);
}

/* --- layer tables and plans ---------------------------------------------------- */

struct kvrt_device_layers {
	struct kvrt_device *dev;       /* owner of the memory */
	struct kvrt_copy_layer *table; /* device memory: [num_layers] */
	uint32_t num_layers;           /* rows */
	uint64_t align_bits;           /* kvrt_copy_layers_bits() */
	struct kvrt_copy_geom geom;    /* the set's geometry */
};

struct kvrt_device_plan {
	struct kvrt_device *dev;    /* owner of the memory */
	struct kvrt_copy_plan plan; /* rows in pinned host memory */
	struct kvrt_copy_tok *dtok; /* device copy of the rows: [cap] */
	struct kvrt_event *uploaded; /* recorded after the last upload */
	bool dirty;                 /* changed since the last upload */
};

int kvrt_device_layers_create(struct kvrt_device *d, const struct kvrt_kv_set *set,
			      struct kvrt_device_layers **out)
{
	*out = NULL;
	if (!set || set->num_layers == 0)
		return -EINVAL;
	struct kvrt_device_layers *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->dev = d;
	l->num_layers = set->num_layers;
	l->align_bits = set->align_bits;
	l->geom = set->geom;
	size_t bytes = (size_t)set->num_layers * sizeof(struct kvrt_copy_layer);
	void *pinned = NULL;
	int rc = kvrt_device_alloc(d, bytes, (void **)&l->table);
	if (rc < 0)
		goto err;
	if ((rc = kvrt_device_alloc_pinned(d, bytes, &pinned)) < 0)
		goto err;
	memcpy(pinned, set->layer, bytes);
	if ((rc = kvrt_stream_memcpy(d->load, l->table, pinned, bytes)) < 0 ||
	    (rc = kvrt_stream_sync(d->load)) < 0)
		goto err;
	kvrt_device_free_pinned(d, pinned);
	*out = l;
	return 0;
err:
	kvrt_device_free_pinned(d, pinned);
	kvrt_device_free(d, l->table);
	free(l);
	return rc;
}

void kvrt_device_layers_destroy(struct kvrt_device_layers *l)
{
	if (!l)
		return;
	kvrt_device_free(l->dev, l->table);
	free(l);
}

int kvrt_device_plan_create(struct kvrt_device *d, const struct kvrt_kv_set *set, uint32_t cap,
			    struct kvrt_device_plan **out)
{
	*out = NULL;
	if (!set || cap == 0)
		return -EINVAL;
	struct kvrt_device_plan *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->dev = d;
	size_t bytes = (size_t)cap * sizeof(struct kvrt_copy_tok);
	void *rows = NULL;
	int rc = kvrt_device_alloc_pinned(d, bytes, &rows);
	if (rc < 0)
		goto err;
	if ((rc = kvrt_device_alloc(d, bytes, (void **)&p->dtok)) < 0)
		goto err;
	if ((rc = kvrt_event_create(d, &p->uploaded)) < 0)
		goto err;
	kvrt_copy_plan_init(&p->plan, &set->geom, rows, cap);
	*out = p;
	return 0;
err:
	kvrt_device_free(d, p->dtok);
	kvrt_device_free_pinned(d, rows);
	free(p);
	return rc;
}

void kvrt_device_plan_destroy(struct kvrt_device_plan *p)
{
	if (!p)
		return;
	/* The last upload may still read the rows. */
	kvrt_event_wait(p->uploaded, UINT64_MAX);
	kvrt_event_destroy(p->uploaded);
	kvrt_device_free(p->dev, p->dtok);
	kvrt_device_free_pinned(p->dev, p->plan.tok);
	free(p);
}

int kvrt_device_plan_reset(struct kvrt_device_plan *p)
{
	int rc = kvrt_event_wait(p->uploaded, UINT64_MAX);
	if (rc < 0)
		return rc;
	kvrt_copy_plan_reset(&p->plan);
	p->dirty = true;
	return 0;
}

int kvrt_device_plan_add(struct kvrt_device_plan *p, const void *chunk, uint32_t chunk_tokens,
			 uint32_t first, uint32_t count, const int64_t *slots)
{
	/* Adding appends after the rows an upload in flight reads; only
	 * reset rewrites them, and it waits for that upload. */
	int rc = kvrt_copy_plan_add(&p->plan, chunk, chunk_tokens, first, count, slots);
	if (rc == 0)
		p->dirty = true;
	return rc;
}

uint32_t kvrt_device_plan_tokens(const struct kvrt_device_plan *p)
{
	return p->plan.num;
}

int kvrt_device_plan_upload(struct kvrt_device_plan *p, struct kvrt_stream *s)
{
	if (s->dev != p->dev)
		return -EINVAL;
	int rc = kvrt_stream_memcpy(s, p->dtok, p->plan.tok,
				    (size_t)p->plan.num * sizeof(struct kvrt_copy_tok));
	if (rc == 0)
		rc = kvrt_event_record(p->uploaded, s);
	if (rc == 0)
		p->dirty = false;
	return rc;
}

static int _launch(struct kvrt_stream *s, const struct kvrt_device_layers *l,
		   const struct kvrt_device_plan *p, uint32_t first, uint32_t count,
		   enum kvrt_copy_dir dir)
{
	if (s->dev != l->dev || s->dev != p->dev || count == 0 || first >= l->num_layers ||
	    count > l->num_layers - first)
		return -EINVAL;
	if (memcmp(&l->geom, &p->plan.geom, sizeof(l->geom)) != 0) {
		kvrt_error("kernels: gather/scatter of a plan made for another set's geometry");
		return -EINVAL;
	}
	if (p->dirty) {
		kvrt_error("kernels: gather/scatter of a plan changed since its upload");
		return -EINVAL;
	}
	if (p->plan.num == 0)
		return 0;
	struct _kvrt_copy_launch launch = {
		.layers = l->table,
		.tok = p->dtok,
		.ntok = p->plan.num,
		.layer_first = first,
		.layer_count = count,
		.width = kvrt_copy_width(l->align_bits | p->plan.addr_bits),
		.geom = l->geom,
		.dir = (int)dir,
	};
	return s->dev->ops->copy(s, &launch);
}

int kvrt_device_gather(struct kvrt_stream *s, const struct kvrt_device_layers *l,
		       const struct kvrt_device_plan *p, uint32_t layer_first, uint32_t layer_count)
{
	return _launch(s, l, p, layer_first, layer_count, KVRT_COPY_GATHER);
}

int kvrt_device_scatter(struct kvrt_stream *s, const struct kvrt_device_layers *l,
			const struct kvrt_device_plan *p, uint32_t layer_first, uint32_t layer_count)
{
	return _launch(s, l, p, layer_first, layer_count, KVRT_COPY_SCATTER);
}
