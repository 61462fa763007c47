// CUDA kernels of pair_chain (csrc/pair_chain.h), one launch per step. A convolution: one thread
// per output entry of the block of pairs; it sums the kh * kw matching window taps of k (and t)
// straight from global memory (neighbouring threads read neighbouring entries), applies the
// affine map and the activation, and writes the outputs once. A pooling: one thread per output
// entry, the mean over all kh kw kh kw pairs of window offsets.
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../pair_chain.h"

namespace torch_ntk {
namespace {

template <typename T>
__global__ void conv_pairs_cuda_kernel(PairGeometry g, const T* __restrict__ k,
                                       const T* __restrict__ t, const T* __restrict__ s1,
                                       const T* __restrict__ s2, T* __restrict__ k_out,
                                       T* __restrict__ t_out, T w2, T b2, T slope, T near,
                                       PairAct act, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t out_pair = g.out_pair(), in_pair = g.in_pair();
  const int64_t p = idx / out_pair, e = idx % out_pair;
  const int64_t i1 = p / g.b2, i2 = p % g.b2;
  int64_t u1, v1, u2, v2;
  if (g.full) {
    v2 = e % g.wo;
    u2 = (e / g.wo) % g.ho;
    v1 = (e / (g.wo * g.ho)) % g.wo;
    u1 = e / (g.wo * g.ho * g.wo);
  } else {
    v1 = v2 = e % g.wo;
    u1 = u2 = e / g.wo;
  }
  const T* kin = k + p * in_pair;
  const T* tin = t ? t + p * in_pair : nullptr;
  T mk = T(0), mt = T(0);
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t h1 = g.sh * u1 + g.dh * a - g.ph, h2 = g.sh * u2 + g.dh * a - g.ph;
    if (h1 < 0 || h1 >= g.h || h2 < 0 || h2 >= g.h) continue;
    for (int64_t b = 0; b < g.kw; ++b) {
      const int64_t w1 = g.sw * v1 + g.dw * b - g.pw, w2i = g.sw * v2 + g.dw * b - g.pw;
      if (w1 < 0 || w1 >= g.w || w2i < 0 || w2i >= g.w) continue;
      const int64_t at = g.full ? ((h1 * g.w + w1) * g.h + h2) * g.w + w2i : h1 * g.w + w1;
      mk += kin[at];
      if (tin) mt += tin[at];
    }
  }
  const T inv = T(1) / T(g.kh * g.kw);
  const T kk = w2 * (mk * inv) + b2;
  const T tt = tin ? w2 * (mt * inv) + kk : kk;
  const int64_t po = g.ho * g.wo;
  const T sa = s1 ? s1[i1 * po + u1 * g.wo + v1] : T(0);
  const T sb = s2 ? s2[i2 * po + u2 * g.wo + v2] : T(0);
  T ko, to;
  pair_activation<T>(kk, tt, sa, sb, act, slope, near, &ko, &to);
  k_out[idx] = ko;
  if (t_out) t_out[idx] = to;
}

template <typename T>
__global__ void pool_pairs_cuda_kernel(PairGeometry g, const T* __restrict__ k,
                                       const T* __restrict__ t, T* __restrict__ k_out,
                                       T* __restrict__ t_out, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t out_pair = g.out_pair(), in_pair = g.in_pair();
  const int64_t p = idx / out_pair, e = idx % out_pair;
  const int64_t v2 = e % g.wo, u2 = (e / g.wo) % g.ho, v1 = (e / (g.wo * g.ho)) % g.wo,
                u1 = e / (g.wo * g.ho * g.wo);
  T mk = T(0), mt = T(0);
  for (int64_t a1 = 0; a1 < g.kh; ++a1)
    for (int64_t b1 = 0; b1 < g.kw; ++b1)
      for (int64_t a2 = 0; a2 < g.kh; ++a2)
        for (int64_t b2 = 0; b2 < g.kw; ++b2) {
          const int64_t at = (((g.sh * u1 + a1) * g.w + g.sw * v1 + b1) * g.h + g.sh * u2 + a2) *
                                 g.w + g.sw * v2 + b2;
          mk += k[p * in_pair + at];
          if (t) mt += t[p * in_pair + at];
        }
  const T inv = T(1) / T(g.kh * g.kw * g.kh * g.kw);
  k_out[idx] = mk * inv;
  if (t_out) t_out[idx] = mt * inv;
}

std::tuple<at::Tensor, at::Tensor> pair_chain_cuda(const at::Tensor& k,
                                                   const c10::optional<at::Tensor>& t,
                                                   at::TensorList s1, at::TensorList s2,
                                                   at::IntArrayRef steps,
                                                   at::ArrayRef<double> scales, bool full,
                                                   bool ntk) {
  const PairChain c = check_pair_chain(k, t, s1, s2, steps, scales, full);
  const c10::cuda::CUDAGuard guard(k.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor kc = k.contiguous();
  at::Tensor tc = t.has_value() && ntk ? t->contiguous() : at::Tensor();
  const int threads = 256;
  for (const PairStep& st : c.steps) {
    const PairGeometry& g = st.g;
    at::Tensor k_next = at::empty({g.b1, g.b2, g.out_pair()}, k.options());
    const bool with_t = tc.defined() || (ntk && st.kind == StepKind::Conv);
    at::Tensor t_next = with_t ? at::empty_like(k_next) : at::Tensor();
    const int64_t total = k_next.numel();
    const int64_t blocks = (total + threads - 1) / threads;
    if (total > 0) {
      AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "pair_chain_cuda", [&] {
        const scalar_t* tin = tc.defined() ? tc.data_ptr<scalar_t>() : nullptr;
        scalar_t* tout = with_t ? t_next.data_ptr<scalar_t>() : nullptr;
        if (st.kind == StepKind::Conv) {
          const scalar_t near =
              scalar_t(1) - scalar_t(8) * std::numeric_limits<scalar_t>::epsilon();
          at::Tensor a = st.side >= 0 ? s1[st.side].contiguous() : at::Tensor();
          at::Tensor b = st.side >= 0 ? s2[st.side].contiguous() : at::Tensor();
          conv_pairs_cuda_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
              g, kc.data_ptr<scalar_t>(), tin, a.defined() ? a.data_ptr<scalar_t>() : nullptr,
              b.defined() ? b.data_ptr<scalar_t>() : nullptr, k_next.data_ptr<scalar_t>(), tout,
              static_cast<scalar_t>(st.w2), static_cast<scalar_t>(st.b2),
              static_cast<scalar_t>(st.slope), near, st.act, total);
        } else {
          pool_pairs_cuda_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
              g, kc.data_ptr<scalar_t>(), tin, k_next.data_ptr<scalar_t>(), tout, total);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    kc = k_next;
    tc = t_next;
  }
  at::Tensor k_out = kc.view(c.out_shape);
  at::Tensor t_out = !ntk ? at::empty({0}, k.options())
                          : (tc.defined() ? tc.view(c.out_shape) : at::zeros_like(k_out));
  return {k_out, t_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ntk, CUDA, m) {
  m.impl("pair_chain", &pair_chain_cuda);
}

}  // namespace torch_ntk
