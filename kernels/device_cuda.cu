/* kernels/device_cuda.cu: the CUDA backend of the device layer (device.h):
 * streams, events, memory, host callbacks. The gather/scatter kernel is in
 * copy_cuda.cu.
 *
 * Every CUDA call is checked; a failure is logged with the call's text and
 * CUDA's error name, and becomes -errno (see _fail) at the API boundary.
 * Nothing here aborts.
 *
 * The current device is per thread in CUDA, and kvrt's actors are threads
 * that never chose one: every entry that talks to a device selects it first
 * (cudaSetDevice is cheap when it is already current).
 *
 * Built by nvcc in the plain variant when configured with CUDA. Compiled as
 * C (no __CUDACC__: sanitizer variants, --without-cuda) it is only the
 * probe, which reports -ENODEV, so the host backend is chosen.
 */
#include <errno.h>

#include "kernels/device_impl.h"

#ifdef __CUDACC__

#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

namespace {

/* Log a failed call and map its error to -errno. */
int _fail(const char *call, cudaError_t e)
{
	_kvrt_device_log_error("kernels: cuda: %s failed: %s (%s)", call, cudaGetErrorName(e),
			       cudaGetErrorString(e));
	switch (e) {
	case cudaErrorMemoryAllocation:
		return -ENOMEM;
	case cudaErrorNoDevice:
	case cudaErrorInsufficientDriver:
	case cudaErrorInvalidDevice:
		return -ENODEV;
	case cudaErrorInvalidValue:
	case cudaErrorHostMemoryAlreadyRegistered:
	case cudaErrorHostMemoryNotRegistered:
		return -EINVAL;
	default:
		return -EIO;
	}
}

#define _CK(call)                                                   \
	do {                                                        \
		cudaError_t _e = (call);                            \
		if (_e != cudaSuccess)                              \
			return _fail(#call, _e);                    \
	} while (0)

/* Log only: for frees, where the caller has nothing to return. */
#define _CK_LOG(call)                                               \
	do {                                                        \
		cudaError_t _e = (call);                            \
		if (_e != cudaSuccess)                              \
			(void)_fail(#call, _e);                     \
	} while (0)

int _select(const struct kvrt_device *d)
{
	_CK(cudaSetDevice(d->ordinal));
	return 0;
}

cudaStream_t _st(const struct kvrt_stream *s)
{
	return (cudaStream_t)s->impl;
}

cudaEvent_t _ev(const struct kvrt_event *e)
{
	return (cudaEvent_t)e->impl;
}

int _open(struct kvrt_device *d)
{
	int rc = _select(d);
	if (rc < 0)
		return rc;
	cudaDeviceProp prop;
	_CK(cudaGetDeviceProperties(&prop, d->ordinal));
	if (!prop.unifiedAddressing) {
		_kvrt_device_log_error("kernels: cuda:%d has no unified addressing", d->ordinal);
		return -ENODEV;
	}
	int direct = 0;
	_CK(cudaDeviceGetAttribute(&direct, cudaDevAttrCanUseHostPointerForRegisteredMem,
				   d->ordinal));
	if (!direct)
		_kvrt_device_log_info("kernels: cuda:%d maps registered host memory at other "
				      "addresses: use kvrt_device_map_host",
				      d->ordinal);
	snprintf(d->name, sizeof(d->name), "cuda:%d %.80s", d->ordinal, prop.name);
	d->impl = NULL;
	return 0;
}

void _close(struct kvrt_device *d)
{
	/* The process (vLLM) owns the context: never reset the device. */
	(void)d;
}

int _stream_create(struct kvrt_stream *s, void *native, bool wrap)
{
	if (wrap) {
		s->impl = native;
		return 0;
	}
	int rc = _select(s->dev);
	if (rc < 0)
		return rc;
	cudaStream_t st;
	_CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
	s->impl = (void *)st;
	return 0;
}

int _stream_sync(struct kvrt_stream *s)
{
	int rc = _select(s->dev);
	if (rc < 0)
		return rc;
	_CK(cudaStreamSynchronize(_st(s)));
	return 0;
}

void _stream_destroy(struct kvrt_stream *s)
{
	if (s->wrapped)
		return;
	if (_select(s->dev) < 0)
		return;
	_CK_LOG(cudaStreamSynchronize(_st(s)));
	_CK_LOG(cudaStreamDestroy(_st(s)));
}

int _stream_wait_event(struct kvrt_stream *s, struct kvrt_event *e)
{
	int rc = _select(s->dev);
	if (rc < 0)
		return rc;
	_CK(cudaStreamWaitEvent(_st(s), _ev(e), 0));
	return 0;
}

int _memcpy_async(struct kvrt_stream *s, void *dst, const void *src, size_t n)
{
	int rc = _select(s->dev);
	if (rc < 0)
		return rc;
	_CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, _st(s)));
	return 0;
}

int _host_fn(struct kvrt_stream *s, void (*fn)(void *), void *arg)
{
	int rc = _select(s->dev);
	if (rc < 0)
		return rc;
	_CK(cudaLaunchHostFunc(_st(s), fn, arg));
	return 0;
}

int _copy(struct kvrt_stream *s, const struct _kvrt_copy_launch *l)
{
	int rc = _select(s->dev);
	if (rc < 0)
		return rc;
	return _kvrt_cuda_copy_launch(s->impl, l);
}

int _event_create(struct kvrt_event *e)
{
	int rc = _select(e->dev);
	if (rc < 0)
		return rc;
	cudaEvent_t ev;
	_CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
	e->impl = (void *)ev;
	return 0;
}

void _event_destroy(struct kvrt_event *e)
{
	if (_select(e->dev) < 0)
		return;
	_CK_LOG(cudaEventDestroy(_ev(e)));
}

int _event_record(struct kvrt_event *e, struct kvrt_stream *s)
{
	int rc = _select(s->dev);
	if (rc < 0)
		return rc;
	_CK(cudaEventRecord(_ev(e), _st(s)));
	return 0;
}

int _event_query(struct kvrt_event *e)
{
	cudaError_t r = cudaEventQuery(_ev(e));
	if (r == cudaSuccess)
		return 0;
	if (r == cudaErrorNotReady)
		return -EBUSY;
	return _fail("cudaEventQuery", r);
}

uint64_t _now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Poll: spin for 20 us (a layer's copy is usually that close), then sleep
 * with a back-off capped at 50 us. cudaEventSynchronize has no timeout. */
int _event_wait(struct kvrt_event *e, uint64_t timeout_ns)
{
	uint64_t start = _now_ns();
	uint64_t nap = 2000;
	for (;;) {
		int rc = _event_query(e);
		if (rc != -EBUSY)
			return rc;
		uint64_t el = _now_ns() - start;
		if (timeout_ns != UINT64_MAX && el >= timeout_ns)
			return -ETIMEDOUT;
		if (el < 20000)
			continue;
		struct timespec ts = {0, (long)nap};
		nanosleep(&ts, NULL);
		if (nap < 50000)
			nap *= 2;
	}
}

int _alloc(struct kvrt_device *d, size_t n, void **out)
{
	int rc = _select(d);
	if (rc < 0)
		return rc;
	_CK(cudaMalloc(out, n));
	return 0;
}

void _free(struct kvrt_device *d, void *p)
{
	if (_select(d) < 0)
		return;
	_CK_LOG(cudaFree(p));
}

int _alloc_pinned(struct kvrt_device *d, size_t n, void **out)
{
	int rc = _select(d);
	if (rc < 0)
		return rc;
	_CK(cudaHostAlloc(out, n, cudaHostAllocPortable | cudaHostAllocMapped));
	return 0;
}

void _free_pinned(struct kvrt_device *d, void *p)
{
	if (_select(d) < 0)
		return;
	_CK_LOG(cudaFreeHost(p));
}

int _host_register(struct kvrt_device *d, void *p, size_t n)
{
	int rc = _select(d);
	if (rc < 0)
		return rc;
	_CK(cudaHostRegister(p, n, cudaHostRegisterPortable | cudaHostRegisterMapped));
	return 0;
}

int _host_unregister(struct kvrt_device *d, void *p)
{
	int rc = _select(d);
	if (rc < 0)
		return rc;
	_CK(cudaHostUnregister(p));
	return 0;
}

int _map_host(struct kvrt_device *d, void *host, void **dev_ptr)
{
	int rc = _select(d);
	if (rc < 0)
		return rc;
	_CK(cudaHostGetDevicePointer(dev_ptr, host, 0));
	return 0;
}

/* C++17 has no designated initialisers: set the table up field by field. */
struct _kvrt_device_ops _make_ops(void)
{
	struct _kvrt_device_ops o;
	memset(&o, 0, sizeof(o));
	o.name = "cuda";
	o.open = _open;
	o.close = _close;
	o.stream_create = _stream_create;
	o.stream_destroy = _stream_destroy;
	o.stream_sync = _stream_sync;
	o.stream_wait_event = _stream_wait_event;
	o.memcpy_async = _memcpy_async;
	o.host_fn = _host_fn;
	o.copy = _copy;
	o.event_create = _event_create;
	o.event_destroy = _event_destroy;
	o.event_record = _event_record;
	o.event_query = _event_query;
	o.event_wait = _event_wait;
	o.alloc = _alloc;
	o.free = _free;
	o.alloc_pinned = _alloc_pinned;
	o.free_pinned = _free_pinned;
	o.host_register = _host_register;
	o.host_unregister = _host_unregister;
	o.map_host = _map_host;
	return o;
}

const struct _kvrt_device_ops _cuda_ops = _make_ops();

} /* namespace */

extern "C" int _kvrt_device_cuda_probe(const struct _kvrt_device_ops **out, int *count)
{
	*out = NULL;
	*count = 0;
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);
	if (e != cudaSuccess || n <= 0) {
		_kvrt_device_log_info("kernels: cuda: no device (%s)",
				      e != cudaSuccess ? cudaGetErrorName(e) : "count 0");
		(void)cudaGetLastError(); /* clear: this was an answer, not a fault */
		return -ENODEV;
	}
	*out = &_cuda_ops;
	*count = n;
	return 0;
}

#else /* !__CUDACC__: a build without the CUDA backend */

int _kvrt_device_cuda_probe(const struct _kvrt_device_ops **out, int *count)
{
	*out = NULL;
	*count = 0;
	return -ENODEV;
}

#endif
