// The pair_chain op: a chain of steps on the infinite-width kernels of a block of B1 x B2 input
// pairs, each step an NTK convolution (then a closed-form activation) or an average pooling.
//
// k (and t, the NTK) hold, per pair, the covariance of the chain's input over pairs of
// positions (full layout: (B1, B2, *S, *S)) or of each position with itself (diagonal:
// (B1, B2, *S)), S of 1 or 2 axes. A convolution step with window offsets d (prod(kernel) of
// them), stride s, dilation r and zero padding pad (before each axis) maps, for output
// positions u, u':
//
//   m[u, u']   = mean_d k[s u + r d - pad, s u' + r d - pad]     (0 outside the input)
//   K          = w2 m + b2,   T = w2 mean_d t[...] + K
//   act none:    (K, T)
//   otherwise:   (E[phi(a) phi(b)], T E[phi'(a) phi'(b)]) for (a, b) Gaussian with covariance
//                [[s1[u]^2, K], [K, s2[u']^2]]; act relu, leaky_relu (slope) or erf,
//
// with s1 (B1, *S_out), s2 (B2, *S_out) each input's standard deviation of the convolution's
// output. A pooling step (full layout only, no padding) takes the mean over every pair of window
// offsets (d, e): k[s u + d, s u' + e]. The chain runs all its steps on a few pairs at a time,
// so nothing between the steps goes to memory.
//
// steps: kStepInts ints per step, in order; 1-D steps have kh = sh = dh = 1, ph = 0, ho = 1.
// scales: w2, b2, slope per step. s1, s2: one tensor per step with an activation, in order.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace torch_ntk {

enum class PairAct { None = 0, Relu = 1, LeakyRelu = 2, Erf = 3 };

// Geometry of one step, with 1-D problems seen as 2-D ones of height 1.
struct PairGeometry {  // passed by value to the CUDA kernel
  int64_t b1, b2, h, w, ho, wo;
  int64_t kh, kw, sh, sw, dh, dw, ph, pw;
  bool full;
  C10_HOST_DEVICE int64_t in_pair() const { return full ? h * w * h * w : h * w; }
  C10_HOST_DEVICE int64_t out_pair() const { return full ? ho * wo * ho * wo : ho * wo; }
};

enum class StepKind { Conv = 0, Pool = 1 };
constexpr int64_t kStepInts = 12;  // kind, act, kh, kw, sh, sw, dh, dw, ph, pw, ho, wo
constexpr int64_t kStepScales = 3;  // w2, b2, slope

// act codes of `steps`: none, relu, leaky_relu, erf.
inline PairAct pair_act(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 3, "pair_chain: act codes are 0 (none), 1 (relu), ",
              "2 (leaky_relu) and 3 (erf); got ", code);
  return static_cast<PairAct>(code);
}

// One step of a chain: geometry (input h, w; output ho, wo), the affine map and the activation.
struct PairStep {
  StepKind kind;
  PairAct act;
  PairGeometry g;
  double w2, b2, slope;
  int64_t side;  // index of the step's s1, s2 entries; -1 without activation
  bool pointwise() const {  // a 1 x 1 window that keeps the positions: no sums to take
    return g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
           g.ho == g.h && g.wo == g.w;
  }
};

struct PairChain {
  int64_t dims;  // spatial axes, 1 or 2
  std::vector<PairStep> steps;
  std::vector<int64_t> out_shape;
  int64_t in_pair() const { return steps.front().g.in_pair(); }
  int64_t out_pair() const { return steps.back().g.out_pair(); }
};

inline void check_side(const char* name, const at::Tensor& s, int64_t rows, const PairStep& st,
                       int64_t dims, const at::Tensor& k) {
  std::vector<int64_t> want = {rows};
  if (dims == 2) want.push_back(st.g.ho);
  want.push_back(st.g.wo);
  TORCH_CHECK(s.sizes() == at::IntArrayRef(want), "pair_chain: ", name, " must be (B",
              name[1], ", *S_out) = ", at::IntArrayRef(want), " for its step, got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == k.scalar_type() && s.device() == k.device(), "pair_chain: ",
              name, " must have k's dtype and device");
}

inline PairChain check_pair_chain(const at::Tensor& k, const c10::optional<at::Tensor>& t,
                                  at::TensorList s1, at::TensorList s2, at::IntArrayRef steps,
                                  at::ArrayRef<double> scales, bool full) {
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kDouble,
              "pair_chain: k must be float32 or float64, got ", k.scalar_type());
  const int64_t per = full ? 2 : 1;
  TORCH_CHECK(k.dim() > 2 && (k.dim() - 2) % per == 0 && (k.dim() - 2) / per <= 2,
              "pair_chain: k must be (B1, B2, *S", full ? ", *S" : "",
              ") with 1 or 2 spatial axes, got ", k.sizes());
  PairChain c;
  c.dims = (k.dim() - 2) / per;
  if (full)
    for (int64_t i = 0; i < c.dims; ++i)
      TORCH_CHECK(k.size(2 + i) == k.size(2 + c.dims + i),
                  "pair_chain: the two sides' spatial shapes differ in k ", k.sizes());
  if (t.has_value())
    TORCH_CHECK(t->sizes() == k.sizes() && t->scalar_type() == k.scalar_type() &&
                    t->device() == k.device(),
                "pair_chain: t must match k in shape, dtype and device; got ", t->sizes(), " ",
                t->scalar_type(), " vs ", k.sizes(), " ", k.scalar_type());
  const auto n = static_cast<int64_t>(steps.size()) / kStepInts;
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(steps.size()) == n * kStepInts &&
                  static_cast<int64_t>(scales.size()) == n * kStepScales,
              "pair_chain: ", kStepInts, " ints and ", kStepScales,
              " scales per step, at least one step; got ", steps.size(), " and ", scales.size());
  int64_t h = c.dims == 2 ? k.size(2) : 1, w = k.size(1 + c.dims), sides = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* v = steps.data() + i * kStepInts;
    TORCH_CHECK(v[0] == 0 || v[0] == 1, "pair_chain: step ", i,
                ": kind must be 0 (convolution) or 1 (pooling), got ", v[0]);
    PairStep st;
    st.kind = static_cast<StepKind>(v[0]);
    st.act = pair_act(v[1]);
    PairGeometry& g = st.g;
    g.b1 = k.size(0);
    g.b2 = k.size(1);
    g.full = full;
    g.h = h;
    g.w = w;
    g.kh = v[2], g.kw = v[3], g.sh = v[4], g.sw = v[5], g.dh = v[6], g.dw = v[7];
    g.ph = v[8], g.pw = v[9], g.ho = v[10], g.wo = v[11];
    TORCH_CHECK(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 &&
                    g.ph >= 0 && g.pw >= 0 && g.ho >= 1 && g.wo >= 1,
                "pair_chain: step ", i,
                ": kernel, stride, dilation and output size must be >= 1, padding >= 0");
    TORCH_CHECK(c.dims == 2 || (g.kh == 1 && g.sh == 1 && g.dh == 1 && g.ph == 0 && g.ho == 1),
                "pair_chain: step ", i, " of a 1-D chain has a height axis");
    if (st.kind == StepKind::Pool) {
      TORCH_CHECK(full, "pair_chain: pooling (step ", i, ") needs the full layout");
      TORCH_CHECK(st.act == PairAct::None && g.dh == 1 && g.dw == 1 && g.ph == 0 && g.pw == 0,
                  "pair_chain: pooling (step ", i, ") has no activation, dilation or padding");
      TORCH_CHECK(g.sh * (g.ho - 1) + g.kh <= h && g.sw * (g.wo - 1) + g.kw <= w,
                  "pair_chain: pooling (step ", i, ") reads past its input of ", h, " x ", w);
    }
    st.w2 = scales[i * kStepScales];
    st.b2 = scales[i * kStepScales + 1];
    st.slope = scales[i * kStepScales + 2];
    st.side = st.act == PairAct::None ? -1 : sides++;
    c.steps.push_back(st);
    h = g.ho;
    w = g.wo;
  }
  TORCH_CHECK(static_cast<int64_t>(s1.size()) == sides && static_cast<int64_t>(s2.size()) == sides,
              "pair_chain: one s1 and one s2 per step with an activation (", sides, "), got ",
              s1.size(), " and ", s2.size());
  for (const PairStep& st : c.steps)
    if (st.side >= 0) {
      check_side("s1", s1[st.side], st.g.b1, st, c.dims, k);
      check_side("s2", s2[st.side], st.g.b2, st, c.dims, k);
    }
  c.out_shape = {k.size(0), k.size(1)};
  for (int64_t rep = 0; rep < per; ++rep) {
    if (c.dims == 2) c.out_shape.push_back(h);
    c.out_shape.push_back(w);
  }
  return c;
}

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
