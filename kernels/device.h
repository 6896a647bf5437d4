/* kernels/device.h: the device layer. One interface, two backends chosen at
 * run time: CUDA when a GPU is usable, the host backend otherwise (no
 * driver, cudaGetDeviceCount failing or finding none, a build without CUDA,
 * or KVRT_DEVICE=host). KVRT_DEVICE=cuda insists on CUDA (open fails with
 * -ENODEV without one); unset or "auto" picks.
 *
 * Walk-through (the load path: one scatter per layer, one event per layer):
 *
 *   struct kvrt_device *dev;   kvrt_device_open(&dev, 0);
 *   struct kvrt_kv_set *set;   kvrt_kv_set_create(&set, tensors, n);  // layout.h
 *   struct kvrt_device_layers *L;  kvrt_device_layers_create(dev, set, &L);
 *   struct kvrt_device_plan *p;    kvrt_device_plan_create(dev, set, 65536, &p);
 *   struct kvrt_stream *ls = kvrt_device_load_stream(dev);
 *   // per step, on the load actor:
 *   kvrt_device_plan_reset(p);
 *   kvrt_device_plan_add(p, chunk, 256, 0, 256, slots);  // per chunk to load
 *   kvrt_device_plan_upload(p, ls);
 *   for (l = 0; l < set->num_layers; l++) {
 *           kvrt_device_scatter(ls, L, p, l, 1);
 *           kvrt_event_record(ev[l], ls);
 *   }
 *   // on vLLM's thread, wait_for_layer_load(l):
 *   kvrt_stream_wait_event(compute, ev[l]);   // GPU waits, CPU does not
 *
 * The host backend emulates a device faithfully, so pipelines above it run
 * the same code paths on a CPU-only machine: a stream is a worker thread
 * running its queue in order; an event is a completion counter (record
 * queues "counter = n", a wait waits for >= n); "device memory" is ordinary
 * memory; copies and gathers run on the stream's thread. A stream made by
 * kvrt_stream_wrap(dev, NULL, ...) on the host backend is the caller's own
 * thread (vLLM's CPU compute): its work runs inline and its waits block.
 *
 * Semantics follow CUDA's: work on one stream runs in order; a record
 * captures all work queued on its stream before it; query and waits refer
 * to the most recent record at the time of the call; an event never
 * recorded counts as complete.
 *
 * Errors: every call returns 0 or -errno; a CUDA error is logged once with
 * the call that failed and becomes -EIO (-ENOMEM for allocations, -ENODEV
 * for a missing device), never an abort. A kernel fault poisons the CUDA
 * context: every later call then returns -EIO.
 *
 * Threads: open/close and create/destroy of any object: any thread, not
 * concurrently with use of that object. Stream operations (copies, gathers,
 * records, waits, posts): any thread; calls on one stream from several
 * threads are ordered as they enter. Event query/wait: any thread. A plan is
 * used by one thread at a time (its owner builds, uploads and launches).
 * Callbacks (kvrt_stream_host_fn, kvrt_stream_post) run on a backend thread
 * and must not call this interface.
 */
#ifndef KVRT_KERNELS_DEVICE_H
#define KVRT_KERNELS_DEVICE_H

#include "kernels/copy.h"
#include "kernels/layout.h"
#include "runtime/actor.h"
#include "runtime/common.h"

struct kvrt_device;
struct kvrt_stream;
struct kvrt_event;
struct kvrt_device_layers;
struct kvrt_device_plan;

enum kvrt_device_kind {
	KVRT_DEVICE_HOST = 1, /* host backend: CPU threads emulate the device */
	KVRT_DEVICE_CUDA = 2, /* a CUDA GPU */
};

/* --- devices ------------------------------------------------------------ */

/* Open device `ordinal` (a CUDA ordinal; ignored by the host backend), with
 * the backend chosen as above, and its load and save streams.
 * 0, -ENODEV (KVRT_DEVICE=cuda without a usable GPU, or a bad ordinal),
 * -EINVAL (KVRT_DEVICE has another value; logged), -ENOMEM, -EIO. */
int kvrt_device_open(struct kvrt_device **out, int ordinal);

/* Wait for every stream of the device to drain, free its streams, close.
 * Objects made from the device must be destroyed first. NULL is ignored. */
void kvrt_device_close(struct kvrt_device *d);

enum kvrt_device_kind kvrt_device_kind(const struct kvrt_device *d);

/* "host", or "cuda:0 NVIDIA H200". */
const char *kvrt_device_name(const struct kvrt_device *d);

/* The device's load stream (scatters) and save stream (gathers). Owned by
 * the device. */
struct kvrt_stream *kvrt_device_load_stream(struct kvrt_device *d);
struct kvrt_stream *kvrt_device_save_stream(struct kvrt_device *d);

/* Posts from stream callbacks that failed (mailbox full past 1 s, or the
 * actor stopped); each is also logged. */
uint64_t kvrt_device_post_failures(const struct kvrt_device *d);

/* --- memory ------------------------------------------------------------- */

/* Device memory (host backend: ordinary memory, 256-byte aligned). */
int kvrt_device_alloc(struct kvrt_device *d, size_t n, void **out);
void kvrt_device_free(struct kvrt_device *d, void *p);

/* Pinned host memory the device reads and writes directly (mapped: see
 * kvrt_device_map_host). Host backend: page-aligned ordinary memory. */
int kvrt_device_alloc_pinned(struct kvrt_device *d, size_t n, void **out);
void kvrt_device_free_pinned(struct kvrt_device *d, void *p);

/* Pin (and map) existing host memory / undo it. Host backend: checks only. */
int kvrt_device_register(struct kvrt_device *d, void *p, size_t n);
int kvrt_device_unregister(struct kvrt_device *d, void *p);

/* The device-visible address of pinned host memory (for plan chunk
 * addresses: a load reads pinned chunks in place, no staging copy). With
 * unified addressing it is the same pointer. 0, -EINVAL (not pinned). */
int kvrt_device_map_host(struct kvrt_device *d, void *host, void **dev_ptr);

/* --- streams ------------------------------------------------------------ */

/* A new stream (host backend: a worker thread). name: for threads/traces. */
int kvrt_stream_create(struct kvrt_device *d, const char *name, struct kvrt_stream **out);

/* A handle on a stream the caller owns (vLLM's compute stream): CUDA takes a
 * cudaStream_t (NULL: the legacy default stream); the host backend takes
 * NULL only and returns the caller-thread stream described above.
 * Destroying the handle leaves the native stream alone. */
int kvrt_stream_wrap(struct kvrt_device *d, void *native, struct kvrt_stream **out);

/* Wait for the stream's work, then free it. NULL is ignored. */
void kvrt_stream_destroy(struct kvrt_stream *s);

/* Wait on this thread until everything queued on s so far has run. */
int kvrt_stream_sync(struct kvrt_stream *s);

/* Work queued on s after this waits for e's most recent record. */
int kvrt_stream_wait_event(struct kvrt_stream *s, struct kvrt_event *e);

/* Copy n bytes in stream order; each side device memory, pinned host
 * memory, or (slow, synchronous for CUDA) pageable memory. */
int kvrt_stream_memcpy(struct kvrt_stream *s, void *dst, const void *src, size_t n);

/* Run fn(arg) once the stream reaches this point, on a backend thread. fn
 * must be short and must not call this interface. */
int kvrt_stream_host_fn(struct kvrt_stream *s, void (*fn)(void *arg), void *arg);

/* A message to post into an actor's mailbox when a stream reaches a point.
 * Caller-owned: it must stay alive and unchanged until the message has been
 * posted (the actor then holds its own copy). */
struct kvrt_stream_post {
	struct kvrt_actor *actor; /* receiver */
	struct kvrt_msg msg;      /* posted by value (kvrt_actor_try_post; if the
				   * mailbox is full, kvrt_actor_post with 1 s) */
	struct kvrt_device *dev;  /* set by kvrt_stream_post: counts failures */
};

/* Post p->msg to p->actor once everything queued on s before has run. */
int kvrt_stream_post(struct kvrt_stream *s, struct kvrt_stream_post *p);

/* --- events ------------------------------------------------------------- */

int kvrt_event_create(struct kvrt_device *d, struct kvrt_event **out);

/* Free. Records and waits already queued on it still run correctly.
 * NULL is ignored. */
void kvrt_event_destroy(struct kvrt_event *e);

/* Capture everything queued on s so far. */
int kvrt_event_record(struct kvrt_event *e, struct kvrt_stream *s);

/* 0 when the most recent record has completed (or there was none),
 * -EBUSY when not yet, -EIO on a device error. Never blocks. */
int kvrt_event_query(struct kvrt_event *e);

/* Wait on this thread (spin briefly, then sleep) until the most recent
 * record completes. 0, -ETIMEDOUT, -EIO. UINT64_MAX: no limit. */
int kvrt_event_wait(struct kvrt_event *e, uint64_t timeout_ns);

/* --- gather / scatter ------------------------------------------------------ */

/* The kernels' layer table of a set, on the device (uploaded once). The set
 * may be destroyed afterwards. */
int kvrt_device_layers_create(struct kvrt_device *d, const struct kvrt_kv_set *set,
			      struct kvrt_device_layers **out);
void kvrt_device_layers_destroy(struct kvrt_device_layers *l);

/* A plan of up to cap tokens for layers of set: pinned host rows the owner
 * fills, and their device copy that kernels read. */
int kvrt_device_plan_create(struct kvrt_device *d, const struct kvrt_kv_set *set, uint32_t cap,
			    struct kvrt_device_plan **out);
void kvrt_device_plan_destroy(struct kvrt_device_plan *p);

/* Empty the plan. Waits (on this thread) for the last upload's copy to have
 * read the rows. The caller must also know that no gather/scatter of the
 * previous contents still runs (an event after them) before uploading again.
 * 0, or the wait's error. */
int kvrt_device_plan_reset(struct kvrt_device_plan *p);

/* Add tokens first .. first+count-1 of a chunk of chunk_tokens tokens at
 * the device-visible address chunk, to/from slots[0 .. count-1] (-1: skip).
 * 0, -EINVAL (bad slot or range; nothing added), -ENOSPC. */
int kvrt_device_plan_add(struct kvrt_device_plan *p, const void *chunk, uint32_t chunk_tokens,
			 uint32_t first, uint32_t count, const int64_t *slots);

/* Tokens in the plan (slots of -1 not counted). */
uint32_t kvrt_device_plan_tokens(const struct kvrt_device_plan *p);

/* Copy the rows to the device in s's order. Gathers and scatters need the
 * plan uploaded since its last change (else -EINVAL). */
int kvrt_device_plan_upload(struct kvrt_device_plan *p, struct kvrt_stream *s);

/* One launch: layers [layer_first, layer_first + layer_count) of every token
 * of p, paged tensor -> chunks (gather) or chunks -> paged tensor (scatter),
 * in s's order. 0, -EINVAL (layer range, plan not uploaded or of another
 * set's geometry), -EIO. */
int kvrt_device_gather(struct kvrt_stream *s, const struct kvrt_device_layers *l,
		       const struct kvrt_device_plan *p, uint32_t layer_first, uint32_t layer_count);
int kvrt_device_scatter(struct kvrt_stream *s, const struct kvrt_device_layers *l,
			const struct kvrt_device_plan *p, uint32_t layer_first, uint32_t layer_count);

#endif
