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
 * _kvrt_cuda_copy_emulate runs the same per-thread code on the CPU, thread
 * by thread over the same grids (tests/test_copy_host.c checks it against
 * the host reference on every layout: the kernel's addressing is tested on
 * machines without a GPU; tests/gpu/ checks the real kernel on one).
 *
 * Compiled as C (no __CUDACC__) both are stubs returning -ENODEV.
 */
#include <errno.h>

#include "kernels/copy.h"
#include "kernels/device_impl.h"

#ifdef __CUDACC__

#include <cuda_runtime.h>

namespace {

/* The host pass (the emulation) has no unroll pragma: gcc warns. */
#ifdef __CUDA_ARCH__
#define _KVRT_UNROLL _Pragma("unroll")
#else
#define _KVRT_UNROLL
#endif

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <int W> struct _vec;
template <> struct _vec<16> { typedef uint4 t; };
template <> struct _vec<8> { typedef uint2 t; };
template <> struct _vec<4> { typedef unsigned int t; };
template <> struct _vec<2> { typedef unsigned short t; };
template <> struct _vec<1> { typedef unsigned char t; };

/* The work of thread tx of block (bx, by) in a grid gx blocks wide: units
 * [0, ntok * upt) of layer layer_first + by. ntok * upt fits in 31 bits
 * (the launcher splits bigger plans). One function for the kernel and for
 * its CPU emulation (_kvrt_cuda_copy_emulate), so the addressing tested on
 * a machine without a GPU is the code the GPU runs. `bad` (emulation only,
 * nullptr on the device) is set when an access is not W-aligned: the width
 * device.c chose was wrong. */
template <int W, bool GATHER>
__host__ __device__ inline void _copy_thread(const struct kvrt_copy_layer *__restrict__ layers,
					     const struct kvrt_copy_tok *__restrict__ tok, uint32_t ntok,
					     uint32_t layer_first, const struct kvrt_copy_geom &g, uint32_t bx,
					     uint32_t by, uint32_t gx, uint32_t tx, bool *bad)
{
	typedef typename _vec<W>::t V;
	const uint32_t l = layer_first + by;
	const struct kvrt_copy_layer L = layers[l];
	const uint32_t upt = g.token_bytes / W; /* units per token */
	const uint32_t kvu = g.kv_bytes / W;    /* units per K (or V) */
	const uint32_t hu = g.head_bytes / W;   /* units per head */
	const uint32_t total = ntok * upt;
	const uint64_t lkv = (uint64_t)l * g.num_kv; /* chunk ranges before layer l */
	const uint32_t step = gx * kThreads * kUnroll;
	for (uint32_t base = bx * kThreads * kUnroll + tx; base < total; base += step) {
		V v[kUnroll];
		char *dst[kUnroll];
		_KVRT_UNROLL
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
#ifndef __CUDA_ARCH__
			if (bad && (((uintptr_t)p | (uintptr_t)c) & (W - 1))) {
				*bad = true;
				continue;
			}
#endif
			if (GATHER) {
				v[k] = *(const V *)p;
				dst[k] = c;
			} else {
				v[k] = *(const V *)c;
				dst[k] = p;
			}
		}
		_KVRT_UNROLL
		for (int k = 0; k < kUnroll; k++)
			if (dst[k])
				*(V *)dst[k] = v[k];
	}
}

template <int W, bool GATHER>
__global__ void __launch_bounds__(kThreads)
	_copy_kernel(const struct kvrt_copy_layer *__restrict__ layers,
		     const struct kvrt_copy_tok *__restrict__ tok, uint32_t ntok,
		     uint32_t layer_first, struct kvrt_copy_geom g)
{
	_copy_thread<W, GATHER>(layers, tok, ntok, layer_first, g, blockIdx.x, blockIdx.y, gridDim.x,
				threadIdx.x, nullptr);
}

/* The grids of one launch: fn(gx, gy, token offset, tokens, layer_first)
 * per grid, stopping at the first nonzero return. Tokens per grid so that
 * units stay below max_units (2^31 - 1 on the GPU); at most max_blocks
 * blocks across (the loop in _copy_thread strides over the rest) and 65535
 * layers down. */
template <int W, class F>
int _for_each_grid(const struct _kvrt_copy_launch *l, uint64_t max_units, uint32_t max_blocks, F fn)
{
	const uint32_t upt = l->geom.token_bytes / W;
	const uint32_t max_tok = (uint32_t)(max_units / upt) ? (uint32_t)(max_units / upt) : 1;
	for (uint32_t t0 = 0; t0 < l->ntok; t0 += max_tok) {
		uint32_t n = l->ntok - t0 < max_tok ? l->ntok - t0 : max_tok;
		uint64_t units = (uint64_t)n * upt;
		uint64_t blocks = (units + kThreads * kUnroll - 1) / (kThreads * kUnroll);
		if (blocks > max_blocks)
			blocks = max_blocks;
		for (uint32_t y0 = 0; y0 < l->layer_count; y0 += 65535) {
			uint32_t ny = l->layer_count - y0 < 65535 ? l->layer_count - y0 : 65535;
			int rc = fn((uint32_t)blocks, ny, t0, n, l->layer_first + y0);
			if (rc)
				return rc;
		}
	}
	return 0;
}

template <int W, bool GATHER>
int _launch_w(cudaStream_t st, const struct _kvrt_copy_launch *l)
{
	return _for_each_grid<W>(l, (1u << 31) - 1, 65535,
				 [&](uint32_t gx, uint32_t gy, uint32_t t0, uint32_t n, uint32_t lf) {
		dim3 grid(gx, gy);
		_copy_kernel<W, GATHER><<<grid, kThreads, 0, st>>>(l->layers, l->tok + t0, n, lf, l->geom);
		cudaError_t e = cudaGetLastError();
		if (e != cudaSuccess) {
			_kvrt_device_log_error("kernels: cuda: gather/scatter launch failed: %s (%s)",
					       cudaGetErrorName(e), cudaGetErrorString(e));
			return -EIO;
		}
		return 0;
	});
}

/* Every thread of every grid in turn, on this CPU (see _copy_thread). */
template <int W, bool GATHER>
int _emulate_w(const struct _kvrt_copy_launch *l, uint64_t max_units, uint32_t max_blocks)
{
	return _for_each_grid<W>(l, max_units, max_blocks,
				 [&](uint32_t gx, uint32_t gy, uint32_t t0, uint32_t n, uint32_t lf) {
		bool bad = false;
		for (uint32_t by = 0; by < gy; by++)
			for (uint32_t bx = 0; bx < gx; bx++)
				for (uint32_t tx = 0; tx < (uint32_t)kThreads; tx++)
					_copy_thread<W, GATHER>(l->layers, l->tok + t0, n, lf, l->geom, bx,
								by, gx, tx, &bad);
		return bad ? -EFAULT : 0;
	});
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

template <bool GATHER>
int _emulate_dir(const struct _kvrt_copy_launch *l, uint64_t max_units, uint32_t max_blocks)
{
	switch (l->width) {
	case 16: return _emulate_w<16, GATHER>(l, max_units, max_blocks);
	case 8: return _emulate_w<8, GATHER>(l, max_units, max_blocks);
	case 4: return _emulate_w<4, GATHER>(l, max_units, max_blocks);
	case 2: return _emulate_w<2, GATHER>(l, max_units, max_blocks);
	default: return _emulate_w<1, GATHER>(l, max_units, max_blocks);
	}
}

} /* namespace */

extern "C" int _kvrt_cuda_copy_launch(void *stream, const struct _kvrt_copy_launch *l)
{
	cudaStream_t st = (cudaStream_t)stream;
	return l->dir == KVRT_COPY_GATHER ? _launch_dir<true>(st, l) : _launch_dir<false>(st, l);
}

extern "C" int _kvrt_cuda_copy_emulate(const struct _kvrt_copy_launch *l, uint64_t max_units,
				       uint32_t max_blocks)
{
	if (!max_units || !max_blocks || !l->width || l->width > 16 || (l->width & (l->width - 1)))
		return -EINVAL;
	if (!l->ntok || !l->layer_count)
		return 0;
	if (l->geom.token_bytes < l->width)
		return -EINVAL;
	return l->dir == KVRT_COPY_GATHER ? _emulate_dir<true>(l, max_units, max_blocks)
					  : _emulate_dir<false>(l, max_units, max_blocks);
}

#else /* !__CUDACC__ */

int _kvrt_cuda_copy_launch(void *stream, const struct _kvrt_copy_launch *l)
{
	(void)stream;
	(void)l;
	return -ENODEV;
}

int _kvrt_cuda_copy_emulate(const struct _kvrt_copy_launch *l, uint64_t max_units, uint32_t max_blocks)
{
	(void)l;
	(void)max_units;
	(void)max_blocks;
	return -ENODEV;
}

#endif
