// The conv_pairs op: one NTK convolution of an infinite-width kernel, and the closed-form
// activation after it, for a block of B1 x B2 input pairs.
//
// k (and t, the NTK) hold, per pair, the covariance of the layer's input over pairs of
// positions (full layout: (B1, B2, *S, *S)) or of each position with itself (diagonal:
// (B1, B2, *S)), S of 1 or 2 axes. With window offsets d (prod(kernel) of them), stride s,
// dilation r and zero padding pad (before each axis), for output positions u, u':
//
//   m[u, u']   = mean_d k[s u + r d - pad, s u' + r d - pad]     (0 outside the input)
//   K          = w2 m + b2,   T = w2 mean_d t[...] + K
//   act "none":  (K, T)
//   otherwise :  (E[phi(a) phi(b)], T E[phi'(a) phi'(b)]) for (a, b) Gaussian with covariance
//                [[s1[u]^2, K], [K, s2[u']^2]]; act in relu, leaky_relu (slope), erf.
//
// s1 (B1, *S_out), s2 (B2, *S_out) are each input's standard deviation of the conv output.
#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace torch_ntk {

enum class PairAct { None, Relu, LeakyRelu, Erf };

inline PairAct parse_pair_act(const std::string& act) {
  if (act == "none" || act == "identity") return PairAct::None;
  if (act == "relu") return PairAct::Relu;
  if (act == "leaky_relu") return PairAct::LeakyRelu;
  if (act == "erf") return PairAct::Erf;
  TORCH_CHECK(false, "conv_pairs: act must be one of none, identity, relu, leaky_relu, erf; got '",
              act, "'");
}

// Geometry of one call, with 1-D problems seen as 2-D ones of height 1.
struct PairGeometry {  // passed by value to the CUDA kernel
  int64_t b1, b2, h, w, ho, wo;
  int64_t kh, kw, sh, sw, dh, dw, ph, pw;
  bool full;
  C10_HOST_DEVICE int64_t in_pair() const { return full ? h * w * h * w : h * w; }
  C10_HOST_DEVICE int64_t out_pair() const { return full ? ho * wo * ho * wo : ho * wo; }
};

// Output shape of conv_pairs for input k of `dims` spatial axes.
inline std::vector<int64_t> conv_pairs_out_shape(const at::Tensor& k, at::IntArrayRef out_size,
                                                 bool full) {
  std::vector<int64_t> shape = {k.size(0), k.size(1)};
  for (int rep = 0; rep < (full ? 2 : 1); ++rep)
    for (auto o : out_size) shape.push_back(o);
  return shape;
}

inline PairGeometry check_conv_pairs(const at::Tensor& k, const c10::optional<at::Tensor>& t,
                                     const at::Tensor& s1, const at::Tensor& s2,
                                     at::IntArrayRef kernel, at::IntArrayRef stride,
                                     at::IntArrayRef dilation, at::IntArrayRef pad,
                                     at::IntArrayRef out_size, bool full, PairAct act) {
  const auto dims = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(dims == 1 || dims == 2, "conv_pairs: 1 or 2 spatial axes, got ", dims);
  TORCH_CHECK(stride.size() == kernel.size() && dilation.size() == kernel.size() &&
                  pad.size() == kernel.size() && out_size.size() == kernel.size(),
              "conv_pairs: kernel, stride, dilation, pad and out_size need one entry per axis");
  TORCH_CHECK(k.dim() == 2 + dims * (full ? 2 : 1), "conv_pairs: k must be (B1, B2, *S",
              full ? ", *S" : "", ") for ", dims, " spatial axes, got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kDouble,
              "conv_pairs: k must be float32 or float64, got ", k.scalar_type());
  if (full)
    for (int64_t i = 0; i < dims; ++i)
      TORCH_CHECK(k.size(2 + i) == k.size(2 + dims + i),
                  "conv_pairs: the two sides' spatial shapes differ in k ", k.sizes());
  if (t.has_value()) {
    TORCH_CHECK(t->sizes() == k.sizes() && t->scalar_type() == k.scalar_type() &&
                    t->device() == k.device(),
                "conv_pairs: t must match k in shape, dtype and device; got ", t->sizes(), " ",
                t->scalar_type(), " vs ", k.sizes(), " ", k.scalar_type());
  }
  for (int64_t i = 0; i < dims; ++i)
    TORCH_CHECK(kernel[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1 && pad[i] >= 0 &&
                    out_size[i] >= 1,
                "conv_pairs: kernel, stride, dilation, out_size must be >= 1 and pad >= 0");
  PairGeometry g;
  g.b1 = k.size(0);
  g.b2 = k.size(1);
  g.full = full;
  auto axis = [&](int64_t i, int64_t def, at::IntArrayRef v) {
    return dims == 2 ? v[i] : (i == 0 ? def : v[0]);
  };
  g.h = dims == 2 ? k.size(2) : 1;
  g.w = dims == 2 ? k.size(3) : k.size(2);
  g.ho = axis(0, 1, out_size);
  g.wo = axis(1, 1, out_size);
  g.kh = axis(0, 1, kernel);
  g.kw = axis(1, 1, kernel);
  g.sh = axis(0, 1, stride);
  g.sw = axis(1, 1, stride);
  g.dh = axis(0, 1, dilation);
  g.dw = axis(1, 1, dilation);
  g.ph = axis(0, 0, pad);
  g.pw = axis(1, 0, pad);
  if (act != PairAct::None) {
    std::vector<int64_t> side = {g.b1};
    for (auto o : out_size) side.push_back(o);
    TORCH_CHECK(s1.sizes() == at::IntArrayRef(side), "conv_pairs: s1 must be (B1, *S_out) = ",
                at::IntArrayRef(side), ", got ", s1.sizes());
    side[0] = g.b2;
    TORCH_CHECK(s2.sizes() == at::IntArrayRef(side), "conv_pairs: s2 must be (B2, *S_out) = ",
                at::IntArrayRef(side), ", got ", s2.sizes());
    TORCH_CHECK(s1.scalar_type() == k.scalar_type() && s2.scalar_type() == k.scalar_type() &&
                    s1.device() == k.device() && s2.device() == k.device(),
                "conv_pairs: s1 and s2 must have k's dtype and device");
  }
  return g;
}

}  // namespace torch_ntk

namespace torch_ntk {

// The closed-form activation of one entry: covariance c and NTK theta of a pre-activation pair
// with standard deviations sa, sb -> (E[phi phi'], theta E[phi' phi']) (written to *k, *t).
// `near`: correlations this close to +-1 (rounding noise of duplicated or opposite inputs)
// become exactly +-1. The operation order follows the pure-torch rules in
// torch_ntk/infinite/rules/activations.py.
template <typename T>
C10_HOST_DEVICE inline void pair_activation(T c, T theta, T sa, T sb, PairAct act, T slope,
                                            T near, T* k, T* t) {
  constexpr T kPi = T(3.14159265358979323846);
  if (act == PairAct::None) {
    *k = c;
    *t = theta;
    return;
  }
  if (act == PairAct::Erf) {
    const T a = (T(1) + T(2) * sa * sa) * (T(1) + T(2) * sb * sb);
    const T dot = T(1) / ::sqrt(c * c * T(-4) + a) * (T(4) / kPi);
    T r = c * (T(2) * (T(1) / ::sqrt(a)));
    r = r > T(1) ? T(1) : (r < T(-1) ? T(-1) : r);
    *k = ::asin(r) * (T(2) / kPi);
    *t = theta * dot;
    return;
  }
  const T ia = sa > T(0) ? T(1) / sa : T(0);
  const T ib = sb > T(0) ? T(1) / sb : T(0);
  T rho = c * ia * ib;
  rho = rho > T(1) ? T(1) : (rho < T(-1) ? T(-1) : rho);
  if (rho >= near) rho = T(1);
  if (rho <= -near) rho = T(-1);
  const T pm = ::asin(rho) + kPi / T(2);
  T kk = (::sqrt(T(1) - rho * rho) + rho * pm) * (sa * (T(1) / (T(2) * kPi))) * sb;
  T dot = pm * (T(1) / (T(2) * kPi));
  if (act == PairAct::LeakyRelu) {
    const T w = (T(1) - slope) * (T(1) - slope);
    kk = kk * w + slope * c;
    dot = dot * w + slope;
  }
  *k = kk;
  *t = theta * dot;
}

}  // namespace torch_ntk
