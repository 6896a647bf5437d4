/* kernels/device_impl.h: internal to the device layer (device.c and its
 * backends device_host.c, device_cuda.cu, copy_cuda.cu). Not for callers:
 * they use device.h.
 *
 * device.c checks arguments and dispatches through a backend's ops table;
 * backends trust their arguments. This header is C and C++ (nvcc compiles
 * the CUDA backend as C++) and includes no runtime/ header (those are C
 * only). Backends keep their state behind the `impl` pointers.
 */
#ifndef KVRT_KERNELS_DEVICE_IMPL_H
#define KVRT_KERNELS_DEVICE_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/copy.h"

#ifdef __cplusplus
extern "C" {
#endif

struct _kvrt_device_ops;

struct kvrt_device {
	const struct _kvrt_device_ops *ops; /* the backend */
	int kind;                           /* enum kvrt_device_kind */
	int ordinal;                        /* CUDA ordinal (host: 0) */
	char name[96];                      /* kvrt_device_name() */
	struct kvrt_stream *load;           /* load stream (owned) */
	struct kvrt_stream *save;           /* save stream (owned) */
	void *impl;                         /* backend state */
	uint64_t post_failures;             /* __atomic: failed stream posts */
};

struct kvrt_stream {
	struct kvrt_device *dev; /* its device */
	void *impl;              /* backend state (CUDA: the cudaStream_t) */
	bool wrapped;            /* caller's native stream: not destroyed */
	char name[32];           /* thread name */
};

struct kvrt_event {
	struct kvrt_device *dev; /* its device */
	void *impl;              /* backend state (CUDA: the cudaEvent_t) */
};

/* One gather/scatter launch, as device.c hands it to a backend. */
struct _kvrt_copy_launch {
	const struct kvrt_copy_layer *layers; /* device-side layer table */
	const struct kvrt_copy_tok *tok;      /* device-side plan rows */
	uint32_t ntok;                        /* rows */
	uint32_t layer_first;                 /* first layer (table index) */
	uint32_t layer_count;                 /* layers in this launch */
	uint32_t width;                       /* widest access allowed: 1..16 */
	struct kvrt_copy_geom geom;           /* shared geometry */
	int dir;                              /* enum kvrt_copy_dir */
};

/* A backend. Every function returns 0 or -errno unless void. */
struct _kvrt_device_ops {
	const char *name;
	/* Fill d->impl and d->name for device d->ordinal. */
	int (*open)(struct kvrt_device *d);
	void (*close)(struct kvrt_device *d);
	/* Fill s->impl: native == NULL && !wrap: a new stream; wrap: the
	 * caller's native stream. */
	int (*stream_create)(struct kvrt_stream *s, void *native, bool wrap);
	void (*stream_destroy)(struct kvrt_stream *s);
	int (*stream_sync)(struct kvrt_stream *s);
	int (*stream_wait_event)(struct kvrt_stream *s, struct kvrt_event *e);
	int (*memcpy_async)(struct kvrt_stream *s, void *dst, const void *src, size_t n);
	int (*host_fn)(struct kvrt_stream *s, void (*fn)(void *), void *arg);
	int (*copy)(struct kvrt_stream *s, const struct _kvrt_copy_launch *l);
	int (*event_create)(struct kvrt_event *e);
	void (*event_destroy)(struct kvrt_event *e);
	int (*event_record)(struct kvrt_event *e, struct kvrt_stream *s);
	int (*event_query)(struct kvrt_event *e);
	int (*event_wait)(struct kvrt_event *e, uint64_t timeout_ns);
	int (*alloc)(struct kvrt_device *d, size_t n, void **out);
	void (*free)(struct kvrt_device *d, void *p);
	int (*alloc_pinned)(struct kvrt_device *d, size_t n, void **out);
	void (*free_pinned)(struct kvrt_device *d, void *p);
	int (*host_register)(struct kvrt_device *d, void *p, size_t n);
	int (*host_unregister)(struct kvrt_device *d, void *p);
	int (*map_host)(struct kvrt_device *d, void *host, void **dev_ptr);
};

/* The host backend (device_host.c). */
extern const struct _kvrt_device_ops _kvrt_device_host_ops;

/* The CUDA backend (device_cuda.cu): *out = its ops when this build has
 * CUDA and at least one device answers; else -ENODEV (and *out = NULL). */
int _kvrt_device_cuda_probe(const struct _kvrt_device_ops **out, int *count);

/* Launch the gather/scatter kernel on a cudaStream_t (copy_cuda.cu).
 * -ENODEV in builds without CUDA. */
int _kvrt_cuda_copy_launch(void *stream, const struct _kvrt_copy_launch *l);

/* Run that kernel's code on this CPU instead (l's pointers are host
 * memory), thread by thread over the grids the launcher would use, with
 * tokens split so that a grid has at most max_units units (the GPU:
 * 2^31 - 1) and at most max_blocks blocks across (the GPU: 65535); small
 * limits exercise the splitting and the kernel's grid-stride loop. For
 * tests. 0; -EFAULT (an access not aligned to l->width); -EINVAL (a bad
 * limit or width); -ENODEV in builds without CUDA. */
int _kvrt_cuda_copy_emulate(const struct _kvrt_copy_launch *l, uint64_t max_units, uint32_t max_blocks);

/* Run a struct kvrt_stream_post (device.c): the callback both backends
 * queue for kvrt_stream_post. */
void _kvrt_device_post_run(void *post);

/* kvrt_error/kvrt_warn for backends written in C++ (device.c). */
void _kvrt_device_log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void _kvrt_device_log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#ifdef __cplusplus
}
#endif

#endif
