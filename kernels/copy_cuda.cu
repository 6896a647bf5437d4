/* kernels/copy_cuda.cu: the gather/scatter kernel (see copy.h for the
 * tables and the chunk layout it implements; copy_host.c is its reference).
 *
 * One launch moves many layers and many tokens: blockIdx.y picks the layer
 * (through the device-side layer table), and the threads of blockIdx.x
 * stride over (token, unit) pairs, a unit being `W` bytes of one token in
 * chunk order. W is the widest access (16 bytes: one uint4) that every
 * address and stride allows, chosen per launch by device.c. The chunk side
 * may be device memory or pinned host memory that the kernel reads or
 * writes in place over PCIe (zero-copy): a load needs no staging copy.
 *
 * Each thread issues UNROLL loads before its stores, so that many reads
 * from host memory are in flight at once (PCIe latency is ~1-2 us).
 * Consecutive threads take consecutive units of one token: a warp reads and
 * writes 32 * W contiguous bytes on the chunk side, and contiguous runs of
 * head_bytes on the paged side.
 *
 * Compiled as C (no __CUDACC__) it is only a stub returning -ENODEV.
 */
#include <errno.h>

#include "kernels/copy.h"
#include "kernels/device_impl.h"

#ifdef __CUDACC__

#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <int W> struct _vec;
template <> struct _vec<16> { typedef uint4 t; };
template <> struct _vec<8> { typedef uint2 t; };
template <> struct _vec<4> { typedef unsigned int t; };
template <> struct _vec<2> { typedef unsigned short t; };
template <> struct _vec<1> { typedef unsigned char t; };

/* Units [0, ntok * upt) of layer layer_first + blockIdx.y. ntok * upt fits
 * in 31 bits (the launcher splits bigger plans). */
template <int W, bool GATHER>
__global__ void __launch_bounds__(kThreads)
	_copy_kernel(const struct kvrt_copy_layer *__restrict__ layers,
		     const struct kvrt_copy_tok *__restrict__ tok, uint32_t ntok,
		     uint32_t layer_first, struct kvrt_copy_geom g)
{
	typedef typename _vec<W>::t V;
	const uint32_t l = layer_first + blockIdx.y;
	const struct kvrt_copy_layer L = layers[l];
	const uint32_t upt = g.token_bytes / W; /* units per token */
	const uint32_t kvu = g.kv_bytes / W;    /* units per K (or V) */
	const uint32_t hu = g.head_bytes / W;   /* units per head */
	const uint32_t total = ntok * upt;
	const uint64_t lkv = (uint64_t)l * g.num_kv; /* chunk ranges before layer l */
	const uint32_t step = gridDim.x * kThreads * kUnroll;
	for (uint32_t base = blockIdx.x * kThreads * kUnroll + threadIdx.x; base < total;
	     base += step) {
		V v[kUnroll];
		char *dst[kUnroll];
#pragma unroll
		for (int k = 0; k < kUnroll; k++) {
			const uint32_t i = base + (uint32_t)k * kThreads;
			dst[k] = nullptr;
			if (i >= total)
				continue;
			const uint32_t j = i / upt;
			const uint32_t u = i - j * upt;
			const struct kvrt_copy_tok e = tok[j];
			if (e.slot < 0)
				continue;
			const uint32_t kv = u / kvu;
			const uint32_t r = u - kv * kvu; /* unit inside this K (or V) */
			const uint32_t h = r / hu;
			const uint32_t b = (r - h * hu) * W; /* byte inside the head */
			const int64_t blk = e.slot / g.block_size;
			const int64_t off = e.slot - blk * g.block_size;
			char *p = (char *)L.base + blk * L.s_block + off * L.s_tok + kv * L.s_kv +
				  h * L.s_head + b;
			char *c = (char *)e.chunk + (lkv + kv) * e.chunk_tokens * g.kv_bytes +
				  (uint64_t)r * W;
			if (GATHER) {
				v[k] = *(const V *)p;
				dst[k] = c;
			} else {
				v[k] = *(const V *)c;
				dst[k] = p;
			}
		}
#pragma unroll
		for (int k = 0; k < kUnroll; k++)
			if (dst[k])
				*(V *)dst[k] = v[k];
	}
}

template <int W, bool GATHER>
int _launch_w(cudaStream_t st, const struct _kvrt_copy_launch *l)
{
	const uint32_t upt = l->geom.token_bytes / W;
	/* Tokens per launch so that units stay below 2^31. */
	const uint32_t max_tok = (uint32_t)(((1u << 31) - 1) / upt);
	for (uint32_t t0 = 0; t0 < l->ntok; t0 += max_tok) {
		uint32_t n = l->ntok - t0 < max_tok ? l->ntok - t0 : max_tok;
		uint64_t units = (uint64_t)n * upt;
		uint64_t blocks = (units + kThreads * kUnroll - 1) / (kThreads * kUnroll);
		if (blocks > 65535)
			blocks = 65535; /* the loop strides over the rest */
		for (uint32_t y0 = 0; y0 < l->layer_count; y0 += 65535) {
			uint32_t ny = l->layer_count - y0 < 65535 ? l->layer_count - y0 : 65535;
			dim3 grid((unsigned)blocks, ny);
			_copy_kernel<W, GATHER><<<grid, kThreads, 0, st>>>(
				l->layers, l->tok + t0, n, l->layer_first + y0, l->geom);
			cudaError_t e = cudaGetLastError();
			if (e != cudaSuccess) {
				_kvrt_device_log_error("kernels: cuda: gather/scatter launch failed: %s (%s)",
						       cudaGetErrorName(e), cudaGetErrorString(e));
				return -EIO;
			}
		}
	}
	return 0;
}

template <bool GATHER>
int _launch_dir(cudaStream_t st, const struct _kvrt_copy_launch *l)
{
	switch (l->width) {
	case 16: return _launch_w<16, GATHER>(st, l);
	case 8: return _launch_w<8, GATHER>(st, l);
	case 4: return _launch_w<4, GATHER>(st, l);
	case 2: return _launch_w<2, GATHER>(st, l);
	default: return _launch_w<1, GATHER>(st, l);
	}
}

} /* namespace */

extern "C" int _kvrt_cuda_copy_launch(void *stream, const struct _kvrt_copy_launch *l)
{
	cudaStream_t st = (cudaStream_t)stream;
	return l->dir == KVRT_COPY_GATHER ? _launch_dir<true>(st, l) : _launch_dir<false>(st, l);
}

#else /* !__CUDACC__ */

int _kvrt_cuda_copy_launch(void *stream, const struct _kvrt_copy_launch *l)
{
	(void)stream;
	(void)l;
	return -ENODEV;
}

#endif
