// CUDA kernels of the gram_sum op family: one thread block per output tile, layers accumulated in
// registers, each output element written once.
//
// The output is viewed as a matrix Θ_view[r, s]: in "full" mode r = n*K + a and s = m*K + b
// (a (N1*K, N2*K) matrix), in "trace" and "diagonal" mode r = n and s = m (diagonal mode runs
// one grid slice per output a). For each layer the block computes the GEMM tile
// G_d[r, s] = A1[r] . A2[s] with A = d viewed as (N*K, q) (full), (N, K*q) (trace) or the
// a-th (N, q) slice (diagonal), staged through shared memory, and multiplies it by the input
// Gram G_h[n(r), m(s)] + c: a second GEMM over h when n(r) = r, or warp dot products into
// shared memory for the few distinct samples of a full-mode tile. Θ_view is symmetric in the
// symmetric variant, so only tiles on or above the diagonal run and write both (r, s) and (s, r).
//
// Two kernels share this structure and differ only in how the GEMM tiles are multiplied:
//
// - gram_sum_kernel (FMA): every thread owns a TM x TN register tile and multiplies with plain
//   FMAs in out's dtype. Used for float64, for float32 when TF32 is not allowed, and on GPUs
//   older than sm_80. Exact up to the accumulation order.
// - gram_sum_mma_kernel (tensor cores, sm_80+): 4 warps in a 2 x 2 grid, each owning a 32 x 32
//   sub-tile held as 2 x 2 WMMA accumulator fragments of 16 x 16 floats. TF32 (m16n16k8) for
//   float32 factors when torch allows TF32 matmuls (torch.backends.cuda.matmul.allow_tf32 or
//   torch.set_float32_matmul_precision("high"/"medium"), read through
//   at::globalContext().allowTF32CuBLAS()); BF16 (m16n16k16) for bfloat16 factors, always.
//   Inputs are rounded to TF32 (round to nearest) / taken as bf16, products accumulate in float32.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>

#include "../gram_sum.h"

namespace torch_ntk {

int64_t cuda_version_cuda() { return CUDART_VERSION; }

std::vector<int64_t> cuda_arch_cuda() {
#ifdef __CUDA_ARCH_LIST__
  std::vector<int64_t> arch = {__CUDA_ARCH_LIST__};  // e.g. 800, 900
  for (auto& a : arch) a /= 10;
  return arch;
#else
  return {};
#endif
}

namespace {

constexpr int kMaxLayers = 12;  // layers per launch; more run as further accumulating launches

template <typename in_t>
struct LayerArgs {
  const in_t* h1;
  const in_t* h2;
  const in_t* d1;
  const in_t* d2;
  double c;
  int64_t p, q;
};

template <typename in_t>
struct GramArgs {
  LayerArgs<in_t> layers[kMaxLayers];
  int n_layers;
  bool accumulate;  // add to out instead of overwriting (launches after the first)
  bool sym;         // only tiles with tile_r <= tile_s; write (r, s) and (s, r)
  int mode;         // 0 full, 1 trace, 2 diagonal
  int64_t k;
  int64_t rows1, rows2;  // rows of the view: N*K (full) or N
  int64_t group;         // K in full mode (r -> n = r / K), else 1
  int64_t col_tiles;     // tiles along s
  int64_t s0, s1, s2, s3;
};

template <typename acc_t, typename in_t>
__device__ __forceinline__ acc_t to_acc(in_t v) {
  return static_cast<acc_t>(v);
}

template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Accumulates the (BM, BN) tile of A B^T, A rows r0.., B rows c0.., inner length kin, into frag;
// thread (ty, tx) owns rows ty + i*TY and columns tx + j*TX.
template <int BM, int BN, int BK, int TM, int TN, typename acc_t, typename in_t>
__device__ __forceinline__ void gemm_tile(const in_t* __restrict__ a, int64_t lda,
                                          int64_t rows_a, int64_t r0,
                                          const in_t* __restrict__ b, int64_t ldb,
                                          int64_t rows_b, int64_t c0, int64_t kin,
                                          acc_t (*as)[BM + 1], acc_t (*bs)[BN + 1],
                                          acc_t (&frag)[TM][TN]) {
  constexpr int TY = BM / TM, TX = BN / TN, THREADS = TX * TY;
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  for (int64_t k0 = 0; k0 < kin; k0 += BK) {
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int row = e / BK, kk = e % BK;
      const int64_t gr = r0 + row, gk = k0 + kk;
      as[kk][row] = (gr < rows_a && gk < kin) ? to_acc<acc_t>(a[gr * lda + gk]) : acc_t(0);
    }
    for (int e = tid; e < BN * BK; e += THREADS) {
      const int row = e / BK, kk = e % BK;
      const int64_t gr = c0 + row, gk = k0 + kk;
      bs[kk][row] = (gr < rows_b && gk < kin) ? to_acc<acc_t>(b[gr * ldb + gk]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = as[kk][ty + i * TY];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = bs[kk][tx + j * TX];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) frag[i][j] = fma(av[i], bv[j], frag[i][j]);
    }
    __syncthreads();
  }
}

// Tile (tile_r, tile_s) of block blockIdx.x: row-major over the grid, or over the upper
// triangle (tile_r <= tile_s) in the symmetric case.
__device__ __forceinline__ void tile_of_block(bool sym, int64_t col_tiles, int64_t& tr,
                                              int64_t& ts) {
  const int64_t t = blockIdx.x;
  if (!sym) {
    tr = t / col_tiles;
    ts = t % col_tiles;
    return;
  }
  // Row tr holds col_tiles - tr tiles; start(tr) = tr*col_tiles - tr*(tr-1)/2.
  const double nb = static_cast<double>(col_tiles);
  int64_t r = static_cast<int64_t>(
      floor((2.0 * nb + 1.0 - sqrt((2.0 * nb + 1.0) * (2.0 * nb + 1.0) - 8.0 * t)) / 2.0));
  auto start = [&](int64_t x) { return x * col_tiles - x * (x - 1) / 2; };
  r = max(int64_t(0), min(r, col_tiles - 1));
  while (r > 0 && start(r) > t) --r;
  while (r + 1 < col_tiles && start(r + 1) <= t) ++r;
  tr = r;
  ts = r + (t - start(r));
}

// Input Gram h1[n] . h2[m] + c of the distinct samples n_lo .. n_lo+nh-1 and m_lo .. m_lo+mh-1
// of a full-mode tile (group >= 2) into gh_s[(n - n_lo) * mh + (m - m_lo)]: one warp per pair,
// lanes split p. The caller brackets it with __syncthreads().
template <typename acc_t, typename in_t>
__device__ __forceinline__ void input_gram_shared(const LayerArgs<in_t>& ly, acc_t c,
                                                  int64_t n_lo, int nh, int64_t m_lo, int mh,
                                                  int n_warps, acc_t* gh_s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = warp; e < nh * mh; e += n_warps) {
    const int64_t n = n_lo + e / mh, m = m_lo + e % mh;
    acc_t sum = acc_t(0);
    for (int64_t kk = lane; kk < ly.p; kk += 32) {
      sum = fma(to_acc<acc_t>(ly.h1[n * ly.p + kk]), to_acc<acc_t>(ly.h2[m * ly.p + kk]), sum);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if (lane == 0) gh_s[e] = sum + c;
  }
}

// Writes v = Θ_view[r, s] into out (and its mirror (s, r) in the symmetric case); skips the
// zero padding past rows1 / rows2 and, when symmetric, the lower triangle s < r.
template <typename acc_t, typename in_t>
__device__ __forceinline__ void store_element(const GramArgs<in_t>& args, int64_t a_diag,
                                              int64_t r, int64_t s, acc_t v,
                                              acc_t* __restrict__ out) {
  if (r >= args.rows1 || s >= args.rows2 || (args.sym && s < r)) return;
  auto offset = [&](int64_t rr, int64_t ss) -> int64_t {
    if (args.mode == 0) {
      return (rr / args.k) * args.s0 + (ss / args.k) * args.s1 + (rr % args.k) * args.s2 +
             (ss % args.k) * args.s3;
    }
    return rr * args.s0 + ss * args.s1 + (args.mode == 2 ? a_diag * args.s2 : 0);
  };
  const int64_t o = offset(r, s);
  out[o] = args.accumulate ? out[o] + v : v;
  if (args.sym && s != r) {
    const int64_t om = offset(s, r);
    out[om] = args.accumulate ? out[om] + v : v;
  }
}

// Leading dimension, inner length and column offset of the output-gradient GEMM of one layer:
// d viewed as (N*K, q) (full), (N, K*q) (trace) or the a-th q-slice of (N, K*q) (diagonal).
template <typename in_t>
__device__ __forceinline__ void grad_gemm_shape(const GramArgs<in_t>& args,
                                                const LayerArgs<in_t>& ly, int64_t a_diag,
                                                int64_t& lda, int64_t& kin, int64_t& a_off) {
  if (args.mode == 0) {
    lda = ly.q, kin = ly.q, a_off = 0;
  } else if (args.mode == 1) {
    lda = args.k * ly.q, kin = args.k * ly.q, a_off = 0;
  } else {
    lda = args.k * ly.q, kin = ly.q, a_off = a_diag * ly.q;
  }
}

template <int BM, int BN, int BK, int TM, int TN, typename acc_t, typename in_t>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    gram_sum_kernel(const GramArgs<in_t> args, acc_t* __restrict__ out) {
  constexpr int TY = BM / TM, TX = BN / TN, THREADS = TX * TY;
  constexpr int GH = BM / 2 + 2;  // distinct samples per tile side when group >= 2
  __shared__ acc_t as[BK][BM + 1];
  __shared__ acc_t bs[BK][BN + 1];
  __shared__ acc_t gh_s[GH * GH];

  int64_t tile_r, tile_s;
  tile_of_block(args.sym, args.col_tiles, tile_r, tile_s);
  const int64_t r0 = tile_r * BM, c0 = tile_s * BN;
  const int64_t a_diag = blockIdx.y;  // output a in diagonal mode, else 0
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int64_t g = args.group;
  const int64_t n_lo = r0 / g, m_lo = c0 / g;
  const int64_t n_hi = (min(r0 + BM, args.rows1) - 1) / g;
  const int64_t m_hi = (min(c0 + BN, args.rows2) - 1) / g;
  const int nh = static_cast<int>(n_hi - n_lo + 1), mh = static_cast<int>(m_hi - m_lo + 1);

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  for (int l = 0; l < args.n_layers; ++l) {
    const LayerArgs<in_t>& ly = args.layers[l];
    const acc_t c = static_cast<acc_t>(ly.c);
    // Output-gradient Gram tile.
    int64_t lda, kin, a_off;
    grad_gemm_shape(args, ly, a_diag, lda, kin, a_off);
    acc_t gd[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) gd[i][j] = acc_t(0);
    gemm_tile<BM, BN, BK, TM, TN>(ly.d1 + a_off, lda, args.rows1, r0, ly.d2 + a_off, lda,
                                  args.rows2, c0, kin, as, bs, gd);
    // Input Gram and accumulation.
    if (g == 1) {
      acc_t gh[TM][TN];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) gh[i][j] = c;
      if (ly.p > 0) {
        gemm_tile<BM, BN, BK, TM, TN>(ly.h1, ly.p, args.rows1, r0, ly.h2, ly.p, args.rows2, c0,
                                      ly.p, as, bs, gh);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(gh[i][j], gd[i][j], acc[i][j]);
    } else {
      __syncthreads();  // previous layer's readers of gh_s are done
      input_gram_shared(ly, c, n_lo, nh, m_lo, mh, THREADS / 32, gh_s);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t r = r0 + ty + i * TY;
        const int ni = static_cast<int>(min(r, args.rows1 - 1) / g - n_lo);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int64_t s = c0 + tx + j * TX;
          const int mj = static_cast<int>(min(s, args.rows2 - 1) / g - m_lo);
          acc[i][j] = fma(gh_s[ni * mh + mj], gd[i][j], acc[i][j]);
        }
      }
    }
  }

  // Write each element once (and its mirror in the symmetric case).
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j)
      store_element(args, a_diag, r0 + ty + i * TY, c0 + tx + j * TX, acc[i][j], out);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core (WMMA) kernel.
//
// Block tile 64 x 64 of Θ_view, 4 warps in a 2 x 2 grid; warp (wm, wn) owns rows
// r0 + 32*wm + 16*i + [0, 16) and columns c0 + 32*wn + 16*j + [0, 16) for i, j in {0, 1}, each
// 16 x 16 piece one accumulator fragment. A GEMM tile G = A1 A2^T over an inner length kin runs
// in chunks of kMmaBK = 32: the block stages A1[r0 .. r0+63, k0 .. k0+31] into as[row][k] and
// A2[c0 .. c0+63, k0 .. k0+31] into bs[row][k] (zeros past the last row or past kin, so
// padding contributes nothing), and each warp multiplies its fragments in k-steps of 8 (TF32,
// m16n16k8) or 16 (BF16, m16n16k16):
//   A fragment: matrix_a, row_major,  element (r, k) at as[r * kPitch + k];
//   B fragment: matrix_b, col_major,  element (k, s) at bs[s * kPitch + k]  (B = A2^T).
// load_matrix_sync needs a 256-bit aligned pointer and ldm (= kPitch) a multiple of 16 bytes:
// the arrays are __align__(32), fragment origins sit at rows that are multiples of 16 and at
// k offsets that are multiples of 8 floats / 16 bf16 (32 bytes), and kPitch = 36 floats
// (144 bytes) or 40 bf16 (80 bytes); 16 rows are 2304 / 1280 bytes, multiples of 32.
//
// The Hadamard step needs gh and gd elementwise. Fragments of one type share one (opaque)
// element-to-position mapping, so when both come from MMAs (group == 1: gh = H1 H2^T + c is a
// second GEMM) acc.x[t] += gh.x[t] * gd.x[t] needs no positions. In full mode with K >= 2 gh
// is looked up per element in gh_s, which needs each element's (row, col): the kernel learns the
// mapping once by loading the fragment with element e = 16*row + col holding the value e
// (exact in float), and uses the same positions to write the output straight from registers.
// ---------------------------------------------------------------------------------------------

constexpr int kMmaBM = 64;      // block tile (rows = columns; the symmetric grid needs BM == BN)
constexpr int kMmaBK = 32;      // inner-dimension chunk staged per __syncthreads()
constexpr int kMmaWarpsN = 2;   // warps along s (and 2 along r)
constexpr int kMmaThreads = 128;
constexpr int kFrag = 16;       // fragment rows / columns
constexpr int kWarpFrags = 2;   // fragments per warp along r and along s (32 x 32 per warp)

namespace wmma = nvcuda::wmma;

// TF32 / BF16 fragments exist only for sm_80+ (and in the host pass); the kernel body is empty
// elsewhere and is never launched there (device_has_mma).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TORCH_NTK_MMA 1

// Per input type: WMMA fragment types, the staged element type and its conversion.
template <typename in_t>
struct MmaTraits;

template <>
struct MmaTraits<float> {  // TF32 tensor cores, float32 accumulation
  static constexpr int kStep = 8;
  static constexpr int kPitch = kMmaBK + 4;  // floats; multiple of 4, skews banks
  using smem_t = float;
  using frag_a = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using frag_b = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using frag_c = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  static __device__ __forceinline__ float stage(float v) {
    return wmma::__float_to_tf32(v);  // round to nearest (cvt.rna.tf32.f32), once per element
  }
  static __device__ __forceinline__ float zero() { return 0.0f; }
};

template <>
struct MmaTraits<__nv_bfloat16> {  // BF16 tensor cores, float32 accumulation
  static constexpr int kStep = 16;
  static constexpr int kPitch = kMmaBK + 8;  // bf16 elements; multiple of 8, skews banks
  using smem_t = __nv_bfloat16;
  using frag_a = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using frag_b = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
  using frag_c = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ __nv_bfloat16 stage(__nv_bfloat16 v) { return v; }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
};

// Accumulates the warp's 2 x 2 fragments of the (64, 64) tile of A B^T (A rows r0.., B rows
// c0.., inner length kin, row-major with leading dimensions lda / ldb) into frag.
template <typename in_t>
__device__ __forceinline__ void mma_gemm_tile(
    const in_t* __restrict__ a, int64_t lda, int64_t rows_a, int64_t r0,
    const in_t* __restrict__ b, int64_t ldb, int64_t rows_b, int64_t c0, int64_t kin,
    typename MmaTraits<in_t>::smem_t* as, typename MmaTraits<in_t>::smem_t* bs,
    typename MmaTraits<in_t>::frag_c (&frag)[kWarpFrags][kWarpFrags]) {
  using T = MmaTraits<in_t>;
  constexpr int P = T::kPitch;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / kMmaWarpsN, wn = warp % kMmaWarpsN;
  for (int64_t k0 = 0; k0 < kin; k0 += kMmaBK) {
    // Consecutive threads read consecutive k of one row: coalesced global loads.
    for (int e = tid; e < kMmaBM * kMmaBK; e += kMmaThreads) {
      const int row = e / kMmaBK, kk = e % kMmaBK;
      const int64_t gr = r0 + row, gc = c0 + row, gk = k0 + kk;
      as[row * P + kk] = (gr < rows_a && gk < kin) ? T::stage(a[gr * lda + gk]) : T::zero();
      bs[row * P + kk] = (gc < rows_b && gk < kin) ? T::stage(b[gc * ldb + gk]) : T::zero();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaBK; kk += T::kStep) {
      typename T::frag_a fa[kWarpFrags];
      typename T::frag_b fb[kWarpFrags];
#pragma unroll
      for (int i = 0; i < kWarpFrags; ++i) {
        wmma::load_matrix_sync(fa[i], as + (wm * 32 + i * kFrag) * P + kk, P);
        wmma::load_matrix_sync(fb[i], bs + (wn * 32 + i * kFrag) * P + kk, P);
      }
#pragma unroll
      for (int i = 0; i < kWarpFrags; ++i)
#pragma unroll
        for (int j = 0; j < kWarpFrags; ++j) wmma::mma_sync(frag[i][j], fa[i], fb[j], frag[i][j]);
    }
    __syncthreads();
  }
}
#endif  // sm_80+

template <typename in_t>
__global__ void __launch_bounds__(kMmaThreads)
    gram_sum_mma_kernel(const GramArgs<in_t> args, float* __restrict__ out) {
#ifdef TORCH_NTK_MMA
  using T = MmaTraits<in_t>;
  using frag_c = typename T::frag_c;
  constexpr int GH = kMmaBM / 2 + 2;  // distinct samples per tile side when group >= 2
  constexpr int kElems = frag_c::num_elements;  // 8 per lane for 16 x 16 over 32 lanes
  __shared__ __align__(32) typename T::smem_t as[kMmaBM * T::kPitch];
  __shared__ __align__(32) typename T::smem_t bs[kMmaBM * T::kPitch];
  __shared__ float gh_s[GH * GH];
  __shared__ __align__(32) float pos_s[kFrag * kFrag];

  int64_t tile_r, tile_s;
  tile_of_block(args.sym, args.col_tiles, tile_r, tile_s);
  const int64_t r0 = tile_r * kMmaBM, c0 = tile_s * kMmaBM;
  const int64_t a_diag = blockIdx.y;  // output a in diagonal mode, else 0
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / kMmaWarpsN, wn = warp % kMmaWarpsN;
  const int64_t g = args.group;
  const int64_t n_lo = r0 / g, m_lo = c0 / g;
  const int64_t n_hi = (min(r0 + kMmaBM, args.rows1) - 1) / g;
  const int64_t m_hi = (min(c0 + kMmaBM, args.rows2) - 1) / g;
  const int nh = static_cast<int>(n_hi - n_lo + 1), mh = static_cast<int>(m_hi - m_lo + 1);

  // Position (row, col) inside a 16 x 16 fragment of this lane's element t.
  for (int e = tid; e < kFrag * kFrag; e += kMmaThreads) pos_s[e] = static_cast<float>(e);
  __syncthreads();
  int prow[kElems], pcol[kElems];
  {
    frag_c pos;
    wmma::load_matrix_sync(pos, pos_s, kFrag, wmma::mem_row_major);
#pragma unroll
    for (int t = 0; t < kElems; ++t) {
      const int e = static_cast<int>(pos.x[t]);
      prow[t] = e / kFrag;
      pcol[t] = e % kFrag;
    }
  }
  // First row / column of fragment (i, j) of this warp.
  auto frag_row = [&](int i) { return r0 + wm * 32 + i * kFrag; };
  auto frag_col = [&](int j) { return c0 + wn * 32 + j * kFrag; };

  frag_c acc[kWarpFrags][kWarpFrags];
#pragma unroll
  for (int i = 0; i < kWarpFrags; ++i)
#pragma unroll
    for (int j = 0; j < kWarpFrags; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int l = 0; l < args.n_layers; ++l) {
    const LayerArgs<in_t>& ly = args.layers[l];
    const float c = static_cast<float>(ly.c);
    // Output-gradient Gram tile.
    int64_t lda, kin, a_off;
    grad_gemm_shape(args, ly, a_diag, lda, kin, a_off);
    frag_c gd[kWarpFrags][kWarpFrags];
#pragma unroll
    for (int i = 0; i < kWarpFrags; ++i)
#pragma unroll
      for (int j = 0; j < kWarpFrags; ++j) wmma::fill_fragment(gd[i][j], 0.0f);
    mma_gemm_tile<in_t>(ly.d1 + a_off, lda, args.rows1, r0, ly.d2 + a_off, lda, args.rows2, c0,
                        kin, as, bs, gd);
    // Input Gram and accumulation.
    if (g == 1) {
      frag_c gh[kWarpFrags][kWarpFrags];
#pragma unroll
      for (int i = 0; i < kWarpFrags; ++i)
#pragma unroll
        for (int j = 0; j < kWarpFrags; ++j) wmma::fill_fragment(gh[i][j], c);
      if (ly.p > 0) {
        mma_gemm_tile<in_t>(ly.h1, ly.p, args.rows1, r0, ly.h2, ly.p, args.rows2, c0, ly.p, as,
                            bs, gh);
      }
#pragma unroll
      for (int i = 0; i < kWarpFrags; ++i)
#pragma unroll
        for (int j = 0; j < kWarpFrags; ++j)
#pragma unroll
          for (int t = 0; t < kElems; ++t)
            acc[i][j].x[t] = fmaf(gh[i][j].x[t], gd[i][j].x[t], acc[i][j].x[t]);
    } else {
      __syncthreads();  // previous layer's readers of gh_s are done
      input_gram_shared(ly, c, n_lo, nh, m_lo, mh, kMmaThreads / 32, gh_s);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kWarpFrags; ++i)
#pragma unroll
        for (int j = 0; j < kWarpFrags; ++j)
#pragma unroll
          for (int t = 0; t < kElems; ++t) {
            // Rows / columns past the end read the last sample's entry; they are never written.
            const int64_t r = min(frag_row(i) + prow[t], args.rows1 - 1);
            const int64_t s = min(frag_col(j) + pcol[t], args.rows2 - 1);
            const int ni = static_cast<int>(r / g - n_lo), mj = static_cast<int>(s / g - m_lo);
            acc[i][j].x[t] = fmaf(gh_s[ni * mh + mj], gd[i][j].x[t], acc[i][j].x[t]);
          }
    }
  }

  // Write each element once (and its mirror in the symmetric case), straight from registers.
#pragma unroll
  for (int i = 0; i < kWarpFrags; ++i)
#pragma unroll
    for (int j = 0; j < kWarpFrags; ++j)
#pragma unroll
      for (int t = 0; t < kElems; ++t)
        store_element(args, a_diag, frag_row(i) + prow[t], frag_col(j) + pcol[t], acc[i][j].x[t],
                      out);
#else
  __trap();  // launched only on sm_80+ (see use_mma)
#endif
}

template <typename in_t>
const in_t* ptr(const at::Tensor& t) {
  return reinterpret_cast<const in_t*>(t.const_data_ptr());
}

// Launches one kernel of the family over the whole output: the FMA kernel with BM x BM tiles and
// TM x TM register tiles per thread, or (kMma) the tensor-core kernel with its 64 x 64 tiles.
template <bool kMma, int BM, int TM, typename acc_t, typename in_t>
void launch(const std::vector<at::Tensor>& h1, const std::vector<at::Tensor>& h2,
            const std::vector<at::Tensor>& d1, const std::vector<at::Tensor>& d2,
            const std::vector<double>& c, GramMode mode, int64_t k, const at::Tensor& out,
            bool sym) {
  static_assert(!kMma || (BM == kMmaBM && sizeof(acc_t) == 4), "MMA tiles are 64 x 64, float");
  constexpr int BK = sizeof(acc_t) == 8 ? 8 : (BM >= 128 ? 8 : 16);
  GramArgs<in_t> args{};
  args.sym = sym;
  args.mode = mode == GramMode::Full ? 0 : (mode == GramMode::Trace ? 1 : 2);
  args.k = k;
  const int64_t n1 = out.size(0), n2 = out.size(1);
  args.group = mode == GramMode::Full ? std::max<int64_t>(k, 1) : 1;
  args.rows1 = n1 * args.group;
  args.rows2 = n2 * args.group;
  args.col_tiles = (args.rows2 + BM - 1) / BM;
  const int64_t row_tiles = (args.rows1 + BM - 1) / BM;
  args.s0 = out.stride(0);
  args.s1 = out.stride(1);
  args.s2 = out.dim() > 2 ? out.stride(2) : 0;
  args.s3 = out.dim() > 3 ? out.stride(3) : 0;
  const int64_t blocks = sym ? row_tiles * (row_tiles + 1) / 2 : row_tiles * args.col_tiles;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "gram_sum: output too large for one launch (",
              blocks, " tiles); tile the call over N1");
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>(mode == GramMode::Diagonal ? k : 1));
  const dim3 block(kMma ? kMmaThreads : (BM / TM) * (BM / TM));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t n_layers = h1.size();
  size_t first = 0;
  do {
    const size_t count = std::min<size_t>(kMaxLayers, n_layers - first);
    args.n_layers = static_cast<int>(count);
    args.accumulate = first > 0;
    for (size_t i = 0; i < count; ++i) {
      const size_t l = first + i;
      args.layers[i] = {ptr<in_t>(h1[l]), ptr<in_t>(h2[l]), ptr<in_t>(d1[l]), ptr<in_t>(d2[l]),
                        c[l], h1[l].size(1), d1[l].size(2)};
    }
    if constexpr (kMma) {
      gram_sum_mma_kernel<in_t><<<grid, block, 0, stream>>>(args, out.data_ptr<float>());
    } else {
      gram_sum_kernel<BM, BM, BK, TM, TM, acc_t, in_t>
          <<<grid, block, 0, stream>>>(args, out.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    first += count;
  } while (first < n_layers);
}

// Tensor cores need sm_80+ (TF32 and BF16 WMMA); the kernels are compiled for sm_80 / sm_90.
bool device_has_mma(const at::Tensor& out) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        out.device().index()));
  return major >= 8;
}

template <typename acc_t, typename in_t>
void dispatch_tile(const std::vector<at::Tensor>& h1, const std::vector<at::Tensor>& h2,
                   const std::vector<at::Tensor>& d1, const std::vector<at::Tensor>& d2,
                   const std::vector<double>& c, GramMode mode, int64_t k,
                   const at::Tensor& out, bool sym) {
  if constexpr (sizeof(acc_t) == 4) {
    // Tensor cores: always for bfloat16 factors; for float32 factors only where torch itself
    // allows TF32 in matmuls (its precision contract), otherwise the exact FMA kernel.
    const bool mma = std::is_same_v<in_t, __nv_bfloat16> ||
                     at::globalContext().allowTF32CuBLAS();
    if (mma && device_has_mma(out)) {
      launch<true, kMmaBM, 1, acc_t, in_t>(h1, h2, d1, d2, c, mode, k, out, sym);
      return;
    }
    // Large register tiles when the input Gram comes from shared memory (full mode, K >= 2).
    if (mode == GramMode::Full && k >= 2) {
      launch<false, 128, 8, acc_t, in_t>(h1, h2, d1, d2, c, mode, k, out, sym);
      return;
    }
  }
  launch<false, 64, 4, acc_t, in_t>(h1, h2, d1, d2, c, mode, k, out, sym);
}

void run_cuda(at::TensorList h1, at::TensorList h2, at::TensorList d1, at::TensorList d2,
              at::ArrayRef<double> c, GramMode mode, int64_t k, const at::Tensor& out,
              bool sym) {
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  std::vector<at::Tensor> h1c, h2c, d1c, d2c;
  std::vector<double> cc;
  at::ScalarType in_type = out.scalar_type();
  for (size_t l = 0; l < h1.size(); ++l) {
    if (d1[l].size(2) == 0) continue;  // q = 0: the layer contributes nothing
    h1c.push_back(h1[l].contiguous());
    h2c.push_back(h2[l].is_same(h1[l]) ? h1c.back() : h2[l].contiguous());
    d1c.push_back(d1[l].contiguous());
    d2c.push_back(d2[l].is_same(d1[l]) ? d1c.back() : d2[l].contiguous());
    cc.push_back(c[l]);
    in_type = d1[l].scalar_type();
  }
  for (size_t l = 0; l < d1c.size(); ++l) {
    TORCH_CHECK(d1c[l].scalar_type() == in_type, "gram_sum: all layers' factors must share one "
                "dtype, got ", in_type, " and ", d1c[l].scalar_type(), " (layer ", l, ")");
  }
  if (out.scalar_type() == at::kDouble) {
    dispatch_tile<double, double>(h1c, h2c, d1c, d2c, cc, mode, k, out, sym);
  } else if (in_type == at::kBFloat16) {
    dispatch_tile<float, __nv_bfloat16>(h1c, h2c, d1c, d2c, cc, mode, k, out, sym);
  } else {
    dispatch_tile<float, float>(h1c, h2c, d1c, d2c, cc, mode, k, out, sym);
  }
}

void gram_sum_out_cuda(at::TensorList h1, at::TensorList h2, at::TensorList d1,
                       at::TensorList d2, at::ArrayRef<double> c, c10::string_view mode,
                       const at::Tensor& out) {
  const char* op = "gram_sum_out";
  const GramMode m = parse_mode(std::string(mode), op);
  const int64_t k = check_gram_inputs(op, h1, h2, d1, d2, c, m, out, /*bf16_factors=*/true);
  run_cuda(h1, h2, d1, d2, c, m, k, out, false);
}

void gram_sum_sym_out_cuda(at::TensorList h, at::TensorList d, at::ArrayRef<double> c,
                           c10::string_view mode, const at::Tensor& out) {
  const char* op = "gram_sum_sym_out";
  const GramMode m = parse_mode(std::string(mode), op);
  const int64_t k = check_gram_sym_inputs(op, h, d, c, m, out, /*bf16_factors=*/true);
  run_cuda(h, h, d, d, c, m, k, out, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ntk, CUDA, m) {
  m.impl("gram_sum_out", &gram_sum_out_cuda);
  m.impl("gram_sum_sym_out", &gram_sum_sym_out_cuda);
}

}  // namespace torch_ntk
