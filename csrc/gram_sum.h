// Declarations and input checks shared by the CPU and CUDA kernels of the gram_sum op family.
//
// For layer factors h1[l] (N1, p_l), h2[l] (N2, p_l), d1[l] (N1, K, q_l), d2[l] (N2, K, q_l)
// and constants c[l]:
//
//   out[n, m, a, b] = sum_l (h1[l][n] . h2[l][m] + c[l]) * (d1[l][n, a] . d2[l][m, b])
//
// mode "full" -> out (N1, N2, K, K), "trace" -> (N1, N2) summed over a = b,
// "diagonal" -> (N1, N2, K) with a = b kept.
#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace torch_ntk {

enum class GramMode { Full, Trace, Diagonal };

inline GramMode parse_mode(const std::string& mode, const char* op) {
  if (mode == "full") return GramMode::Full;
  if (mode == "trace") return GramMode::Trace;
  if (mode == "diagonal") return GramMode::Diagonal;
  TORCH_CHECK(false, op, ": mode must be one of ('full', 'trace', 'diagonal'), got '", mode, "'");
}

// Number of dimensions of out per mode.
inline int64_t out_dim(GramMode mode) {
  return mode == GramMode::Full ? 4 : (mode == GramMode::Trace ? 2 : 3);
}

// Validates shapes, dtypes and devices of one call; returns K (outputs per sample).
// bf16_factors: CUDA accepts bfloat16 factors with a float32 out.
inline int64_t check_gram_inputs(const char* op, at::TensorList h1, at::TensorList h2,
                                 at::TensorList d1, at::TensorList d2, at::ArrayRef<double> c,
                                 GramMode mode, const at::Tensor& out,
                                 bool bf16_factors = false) {
  const auto n_layers = h1.size();
  TORCH_CHECK(h2.size() == n_layers && d1.size() == n_layers && d2.size() == n_layers &&
                  c.size() == n_layers,
              op, ": h1, h2, d1, d2 and c must have one entry per layer; got lengths ", h1.size(),
              ", ", h2.size(), ", ", d1.size(), ", ", d2.size(), " and ", c.size());
  TORCH_CHECK(out.dim() == out_dim(mode), op, ": out must have ", out_dim(mode),
              " dimensions for this mode (full (N1, N2, K, K), trace (N1, N2), diagonal "
              "(N1, N2, K)), got shape ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, op,
              ": out must be float32 or float64, got ", out.scalar_type());
  const int64_t n1 = out.size(0), n2 = out.size(1);
  int64_t k = -1;
  if (mode == GramMode::Full) {
    TORCH_CHECK(out.size(2) == out.size(3), op, ": out must be (N1, N2, K, K), got ",
                out.sizes());
    k = out.size(2);
  } else if (mode == GramMode::Diagonal) {
    k = out.size(2);
  }
  const bool bf16_ok = bf16_factors && out.scalar_type() == at::kFloat;
  auto check_factor = [&](const at::Tensor& t, const char* name, size_t l, int64_t dim,
                          int64_t rows) {
    TORCH_CHECK(t.dim() == dim, op, ": ", name, "[", l, "] must have ", dim,
                " dimensions, got shape ", t.sizes());
    TORCH_CHECK(t.size(0) == rows, op, ": ", name, "[", l, "] must have ", rows,
                " rows to match out ", out.sizes(), ", got shape ", t.sizes());
    TORCH_CHECK(t.device() == out.device(), op, ": ", name, "[", l, "] must be on ",
                out.device(), " like out, got ", t.device());
    TORCH_CHECK(t.scalar_type() == out.scalar_type() ||
                    (bf16_ok && t.scalar_type() == at::kBFloat16),
                op, ": ", name, "[", l, "] must have out's dtype ", out.scalar_type(),
                (bf16_ok ? " (or bfloat16)" : ""), ", got ", t.scalar_type());
  };
  for (size_t l = 0; l < n_layers; ++l) {
    check_factor(h1[l], "h1", l, 2, n1);
    check_factor(h2[l], "h2", l, 2, n2);
    check_factor(d1[l], "d1", l, 3, n1);
    check_factor(d2[l], "d2", l, 3, n2);
    TORCH_CHECK(h1[l].size(1) == h2[l].size(1), op, ": h1[", l, "] and h2[", l,
                "] must have the same width p, got ", h1[l].sizes(), " and ", h2[l].sizes());
    TORCH_CHECK(d1[l].size(1) == d2[l].size(1) && d1[l].size(2) == d2[l].size(2), op, ": d1[",
                l, "] and d2[", l, "] must agree in (K, q), got ", d1[l].sizes(), " and ",
                d2[l].sizes());
    if (k < 0) k = d1[l].size(1);
    TORCH_CHECK(d1[l].size(1) == k, op, ": d1[", l, "] must have K = ", k,
                " outputs (from out and the other layers), got shape ", d1[l].sizes());
    TORCH_CHECK(h1[l].scalar_type() == d1[l].scalar_type() &&
                    h2[l].scalar_type() == d1[l].scalar_type() &&
                    d2[l].scalar_type() == d1[l].scalar_type(),
                op, ": the factors of layer ", l, " must share one dtype, got h1 ",
                h1[l].scalar_type(), ", h2 ", h2[l].scalar_type(), ", d1 ",
                d1[l].scalar_type(), ", d2 ", d2[l].scalar_type());
  }
  return k < 0 ? 0 : k;
}

// Checks of the symmetric variant: N1 == N2 on top of check_gram_inputs.
inline int64_t check_gram_sym_inputs(const char* op, at::TensorList h, at::TensorList d,
                                     at::ArrayRef<double> c, GramMode mode,
                                     const at::Tensor& out, bool bf16_factors = false) {
  TORCH_CHECK(out.dim() >= 2 && out.size(0) == out.size(1), op,
              ": out must be square in its first two dimensions (N, N, ...), got ", out.sizes());
  return check_gram_inputs(op, h, h, d, d, c, mode, out, bf16_factors);
}

}  // namespace torch_ntk
