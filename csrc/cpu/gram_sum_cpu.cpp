// CPU kernel of the gram_sum op family: output tiles in parallel, layers accumulated per tile.
//
// Each task owns an output tile of tn x tm samples. For every layer it computes the tile's input
// Gram G_h = H1 H2^T (tn, tm) and output-gradient Gram G_d with ATen GEMMs into task-local
// buffers, then adds (G_h + c) * G_d straight into out (the first layer overwrites). Extra memory
// is two tile buffers per thread; out is written in place through its strides.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gram_sum.h"

namespace torch_ntk {
namespace {

// One layer's factors: h (N, p) contiguous; d (N, K, q) contiguous for the full kernel, else
// any layout with unit stride along q (e.g. a (K, N, q) tensor seen as (N, K, q)).
struct Layer {
  at::Tensor h1, h2, d1, d2;
  double c;
  int64_t p, q;
  bool flat;  // d1 and d2 contiguous: the trace is one GEMM over K*q
};

struct Tile {
  int64_t n0, tn, m0, tm;
};

// d as the kernel reads it: contiguous for the full kernel; for the trace and the diagonal any
// layout whose rows along q are unit-stride (a transposing copy would cost more than it saves).
at::Tensor gradient_factor(const at::Tensor& d, GramMode mode) {
  if (mode != GramMode::Full && (d.stride(2) == 1 || d.size(2) == 1)) return d;
  return d.contiguous();
}

std::vector<Layer> canonical_layers(at::TensorList h1, at::TensorList h2, at::TensorList d1,
                                    at::TensorList d2, at::ArrayRef<double> c, GramMode mode) {
  std::vector<Layer> layers;
  for (size_t l = 0; l < h1.size(); ++l) {
    if (d1[l].size(2) == 0) continue;  // q = 0: the layer contributes nothing
    at::Tensor h1c = h1[l].contiguous(), d1c = gradient_factor(d1[l], mode);
    at::Tensor h2c = h2[l].is_same(h1[l]) ? h1c : h2[l].contiguous();
    at::Tensor d2c = d2[l].is_same(d1[l]) ? d1c : gradient_factor(d2[l], mode);
    const bool flat = d1c.is_contiguous() && d2c.is_contiguous();
    layers.push_back({h1c, h2c, d1c, d2c, c[l], h1[l].size(1), d1[l].size(2), flat});
  }
  return layers;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile edge in samples: GEMMs of about `rows` rows (K*t in full mode), halved until every
// thread has at least two tiles.
int64_t choose_tile(GramMode mode, int64_t k, int64_t n1, int64_t n2, bool sym) {
  const int64_t rows = mode == GramMode::Full ? 320 : (mode == GramMode::Trace ? 256 : 128);
  const int64_t per = mode == GramMode::Full ? std::max<int64_t>(k, 1) : 1;
  int64_t t = std::max<int64_t>(8, rows / per);
  const int64_t want = 2 * at::get_num_threads();
  auto count = [&](int64_t s) {
    const int64_t b1 = ceil_div(n1, s), b2 = ceil_div(n2, s);
    return sym ? b1 * (b1 + 1) / 2 : b1 * b2;
  };
  while (t > 8 && count(t) < want) t = std::max<int64_t>(8, t / 2);
  return t;
}

// Whether the whole output is one tile, its GEMMs threaded by ATen: when one tile's factor rows
// don't fit in cache (wide per-sample gradients, e.g. a Jacobian of 10^5 parameters), every
// extra row block of tiles reads all the factors again from memory, which costs more than the
// tiles' parallelism gains; only while the output's rows stay few (its buffers small).
bool one_tile(const std::vector<Layer>& layers, GramMode mode, int64_t k, int64_t n1,
              int64_t n2, int64_t t, int64_t itemsize) {
  const int64_t per = mode == GramMode::Full ? std::max<int64_t>(k, 1) : 1;
  if (n1 * per > 2048 || n2 * per > 2048) return false;
  int64_t row_bytes = 0;
  for (const Layer& ly : layers) row_bytes += (ly.p + k * ly.q) * itemsize;
  return row_bytes * std::min(t, std::max(n1, n2)) > (int64_t(8) << 20);
}

std::vector<Tile> make_tiles(int64_t n1, int64_t n2, int64_t t, bool sym) {
  std::vector<Tile> tiles;
  for (int64_t n0 = 0; n0 < n1; n0 += t) {
    for (int64_t m0 = sym ? n0 : 0; m0 < n2; m0 += t) {
      tiles.push_back({n0, std::min(t, n1 - n0), m0, std::min(t, n2 - m0)});
    }
  }
  return tiles;
}

// out (+)= a bᵀ for a (rows, q), b (cols, q), out (rows, cols); `per` rows per sample. On a
// diagonal tile of a symmetric output (`diag`: a and b hold the same samples) the block below
// the diagonal is skipped: mirror_tile overwrites those entries, and a quarter of the tile's
// multiply-adds are saved. What the skipped block then holds is never read into the result.
void tile_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t per,
             bool diag, bool accumulate) {
  auto mm = [accumulate](const at::Tensor& o, const at::Tensor& x, const at::Tensor& y) {
    if (accumulate) o.addmm_(x, y.t());
    else at::mm_out(const_cast<at::Tensor&>(o), x, y.t());
  };
  const int64_t rows = out.size(0), samples = rows / per;
  if (!diag || samples < 16) {
    mm(out, a, b);
    return;
  }
  const int64_t h = (samples / 2) * per;
  mm(out.narrow(0, 0, h), a.narrow(0, 0, h), b);
  mm(out.narrow(0, h, rows - h).narrow(1, h, rows - h), a.narrow(0, h, rows - h),
     b.narrow(0, h, rows - h));
}

// Columns per chunk of a long reduction (a reduction shorter than one is not split), and the
// tile edge (samples) up to which a single tile's trace GEMMs are split along it (see
// reduce_mm) and its diagonal's GEMMs, one per output, run in parallel.
constexpr int64_t kReduceChunk = int64_t(1) << 17;
constexpr int64_t kFewRows = 64;

// out (+)= a bᵀ like tile_mm, for a tile of few rows and columns whose reduction (the columns of
// a and b) is long: the trace and the diagonal of wide per-sample gradients. The BLAS threads a
// GEMM over its output, which such a tile barely has, so it would run on one thread; here the
// reduction is cut into an even number of chunks of at most kReduceChunk columns, each chunk's
// GEMM runs on one thread, and the partial products are summed in chunk order (the same sums
// whatever the thread count).
// A shorter reduction, or one inside a parallel region (tiles already spread over the
// threads), is tile_mm's (`diag` as there).
void reduce_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool diag,
               bool accumulate) {
  const int64_t len = a.size(1);
  if (len < kReduceChunk || at::in_parallel_region() || at::get_num_threads() < 2) {
    tile_mm(out, a, b, 1, diag, accumulate);
    return;
  }
  const int64_t chunks = 2 * ceil_div(len, 2 * kReduceChunk);   // even: two threads balance
  const int64_t step = ceil_div(len, chunks);
  at::Tensor partial = at::zeros({chunks, out.size(0), out.size(1)}, out.options());
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * step, width = std::min(step, len - start);
      if (width <= 0) continue;
      at::Tensor part = partial.select(0, c);
      at::mm_out(part, a.narrow(1, start, width), b.narrow(1, start, width).t());
    }
  });
  at::Tensor total = partial.sum(0);
  if (accumulate) out.add_(total);
  else out.copy_(total);
}

// out[i, j, a, b] (+)= (gh[i, j] + c) * gd[i*K + a, j*K + b] over the tile.
template <typename scalar_t, bool kFirst, bool kUnitStride>
void add_full(scalar_t* out, const int64_t* st, const scalar_t* gh, scalar_t c,
              const scalar_t* gd, int64_t tn, int64_t tm, int64_t k) {
  const int64_t s3 = kUnitStride ? 1 : st[3];
  for (int64_t i = 0; i < tn; ++i) {
    for (int64_t a = 0; a < k; ++a) {
      const scalar_t* gd_row = gd + (i * k + a) * tm * k;
      scalar_t* out_row = out + i * st[0] + a * st[2];
      for (int64_t j = 0; j < tm; ++j) {
        const scalar_t g = gh ? gh[i * tm + j] + c : c;
        const scalar_t* src = gd_row + j * k;
        scalar_t* dst = out_row + j * st[1];
        for (int64_t b = 0; b < k; ++b) {
          if (kFirst) {
            dst[b * s3] = g * src[b];
          } else {
            dst[b * s3] += g * src[b];
          }
        }
      }
    }
  }
}

// out[i, j(, a)] (+)= (gh[i, j] + c) * gd[(a,) i, j]; trace when k_diag == 1 and st[2] unused.
template <typename scalar_t, bool kFirst>
void add_small(scalar_t* out, const int64_t* st, const scalar_t* gh, scalar_t c,
               const scalar_t* gd, int64_t tn, int64_t tm, int64_t k_diag) {
  for (int64_t a = 0; a < k_diag; ++a) {
    const scalar_t* gd_a = gd + a * tn * tm;
    for (int64_t i = 0; i < tn; ++i) {
      scalar_t* dst = out + i * st[0] + a * st[2];
      for (int64_t j = 0; j < tm; ++j) {
        const scalar_t g = gh ? gh[i * tm + j] + c : c;
        if (kFirst) {
          dst[j * st[1]] = g * gd_a[i * tm + j];
        } else {
          dst[j * st[1]] += g * gd_a[i * tm + j];
        }
      }
    }
  }
}

// Zeroes the tile (no contributing layer).
template <typename scalar_t>
void zero_tile(scalar_t* out, const int64_t* st, int64_t dim, int64_t tn, int64_t tm,
               int64_t k) {
  const int64_t ka = dim >= 3 ? k : 1, kb = dim == 4 ? k : 1;
  for (int64_t i = 0; i < tn; ++i)
    for (int64_t j = 0; j < tm; ++j)
      for (int64_t a = 0; a < ka; ++a)
        for (int64_t b = 0; b < kb; ++b)
          out[i * st[0] + j * st[1] + a * (dim >= 3 ? st[2] : 0) + b * (dim == 4 ? st[3] : 0)] =
              scalar_t(0);
}

// Symmetric case: writes the transpose of tile (n0, m0) into (m0, n0); on a diagonal tile
// (n0 == m0) copies its upper half onto its lower half, so out is exactly symmetric.
template <typename scalar_t>
void mirror_tile(scalar_t* base, const int64_t* st, int64_t dim, const Tile& t, int64_t k) {
  const int64_t ka = dim >= 3 ? k : 1, kb = dim == 4 ? k : 1;
  const int64_t s2 = dim >= 3 ? st[2] : 0, s3 = dim == 4 ? st[3] : 0;
  const bool diag_tile = t.n0 == t.m0;
  for (int64_t i = 0; i < t.tn; ++i) {
    const int64_t n = t.n0 + i;
    for (int64_t j = diag_tile ? i : 0; j < t.tm; ++j) {
      const int64_t m = t.m0 + j;
      const scalar_t* src = base + n * st[0] + m * st[1];
      scalar_t* dst = base + m * st[0] + n * st[1];
      for (int64_t a = 0; a < ka; ++a) {
        for (int64_t b = (n == m && dim == 4) ? a + 1 : 0; b < kb; ++b) {
          if (dim == 4) {
            dst[b * s2 + a * s3] = src[a * s2 + b * s3];
          } else if (n != m) {
            dst[a * s2] = src[a * s2];
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void gram_sum_cpu_impl(const std::vector<Layer>& layers, GramMode mode, int64_t k,
                       const at::Tensor& out, bool sym) {
  const int64_t n1 = out.size(0), n2 = out.size(1), dim = out.dim();
  if (n1 == 0 || n2 == 0 || out.numel() == 0) return;
  const int64_t chosen = choose_tile(mode, k, n1, n2, sym);
  const bool single = one_tile(layers, mode, k, n1, n2, chosen, out.element_size());
  const int64_t t = single ? std::max(n1, n2) : chosen;
  const std::vector<Tile> tiles = make_tiles(n1, n2, t, sym);
  int64_t st[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < dim; ++i) st[i] = out.stride(i);
  scalar_t* out_base = out.data_ptr<scalar_t>();
  const auto opts = out.options();
  const int64_t gd_elems = mode == GramMode::Trace ? t * t : t * t * k * k;
  const int64_t kd = mode == GramMode::Diagonal ? k : 1;

  auto run_tiles = [&](int64_t begin, int64_t end) {
    at::Tensor gh_buf = at::empty({t * t}, opts);
    at::Tensor gd_buf = at::empty({std::max<int64_t>(gd_elems, 1)}, opts);
    for (int64_t ti = begin; ti < end; ++ti) {
      const Tile& tile = tiles[ti];
      const int64_t tn = tile.tn, tm = tile.tm;
      scalar_t* out_tile = out_base + tile.n0 * st[0] + tile.m0 * st[1];
      const bool diag = sym && tile.n0 == tile.m0;
      bool first = true;
      for (const Layer& ly : layers) {
        const scalar_t* gh = nullptr;
        if (ly.p > 0) {
          at::Tensor gh_t = gh_buf.narrow(0, 0, tn * tm).view({tn, tm});
          tile_mm(gh_t, ly.h1.narrow(0, tile.n0, tn), ly.h2.narrow(0, tile.m0, tm), 1, diag,
                  false);
          gh = gh_buf.data_ptr<scalar_t>();
        }
        const scalar_t c = static_cast<scalar_t>(ly.c);
        const scalar_t* gd = gd_buf.data_ptr<scalar_t>();
        if (mode == GramMode::Full) {
          at::Tensor gd_t = gd_buf.narrow(0, 0, tn * k * tm * k).view({tn * k, tm * k});
          tile_mm(gd_t, ly.d1.view({-1, ly.q}).narrow(0, tile.n0 * k, tn * k),
                  ly.d2.view({-1, ly.q}).narrow(0, tile.m0 * k, tm * k), k, diag, false);
          const bool unit = st[3] == 1;
          if (first && unit) add_full<scalar_t, true, true>(out_tile, st, gh, c, gd, tn, tm, k);
          else if (first) add_full<scalar_t, true, false>(out_tile, st, gh, c, gd, tn, tm, k);
          else if (unit) add_full<scalar_t, false, true>(out_tile, st, gh, c, gd, tn, tm, k);
          else add_full<scalar_t, false, false>(out_tile, st, gh, c, gd, tn, tm, k);
        } else {
          // A single tile of few samples: its long reductions are split over the threads.
          const bool few = single && tn <= kFewRows && tm <= kFewRows;
          auto mm = [&](const at::Tensor& o, const at::Tensor& x, const at::Tensor& y,
                        bool accumulate) {
            if (few) reduce_mm(o, x, y, diag, accumulate);
            else tile_mm(o, x, y, 1, diag, accumulate);
          };
          if (mode == GramMode::Trace && ly.flat) {
            at::Tensor gd_t = gd_buf.narrow(0, 0, tn * tm).view({tn, tm});
            mm(gd_t, ly.d1.view({-1, k * ly.q}).narrow(0, tile.n0, tn),
               ly.d2.view({-1, k * ly.q}).narrow(0, tile.m0, tm), false);
          } else if (mode == GramMode::Trace) {  // Σ_a D1_a D2_aᵀ, one GEMM per output
            at::Tensor gd_t = gd_buf.narrow(0, 0, tn * tm).view({tn, tm});
            for (int64_t a = 0; a < k; ++a) {
              mm(gd_t, ly.d1.select(1, a).narrow(0, tile.n0, tn),
                 ly.d2.select(1, a).narrow(0, tile.m0, tm), a > 0);
            }
          } else {   // one GEMM per output: those of a single tile of few samples in parallel
            auto output = [&](int64_t a) {
              at::Tensor gd_t = gd_buf.narrow(0, a * tn * tm, tn * tm).view({tn, tm});
              tile_mm(gd_t, ly.d1.select(1, a).narrow(0, tile.n0, tn),
                      ly.d2.select(1, a).narrow(0, tile.m0, tm), 1, diag, false);
            };
            if (few && k > 1) {
              at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
                for (int64_t a = begin; a < end; ++a) output(a);
              });
            } else {
              for (int64_t a = 0; a < k; ++a) output(a);
            }
          }
          if (first) add_small<scalar_t, true>(out_tile, st, gh, c, gd, tn, tm, kd);
          else add_small<scalar_t, false>(out_tile, st, gh, c, gd, tn, tm, kd);
        }
        first = false;
      }
      if (first) zero_tile<scalar_t>(out_tile, st, dim, tn, tm, k);
      if (sym) mirror_tile<scalar_t>(out_base, st, dim, tile, k);
    }
  };
  if (single)   // outside a parallel region, so the GEMMs use ATen's threads
    run_tiles(0, static_cast<int64_t>(tiles.size()));
  else
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, run_tiles);
}

void run_cpu(const std::vector<Layer>& layers, GramMode mode, int64_t k, const at::Tensor& out,
             bool sym) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gram_sum_cpu", [&] {
    gram_sum_cpu_impl<scalar_t>(layers, mode, k, out, sym);
  });
}

void gram_sum_out_cpu(at::TensorList h1, at::TensorList h2, at::TensorList d1,
                      at::TensorList d2, at::ArrayRef<double> c, c10::string_view mode,
                      const at::Tensor& out) {
  const char* op = "gram_sum_out";
  const GramMode m = parse_mode(std::string(mode), op);
  const int64_t k = check_gram_inputs(op, h1, h2, d1, d2, c, m, out);
  run_cpu(canonical_layers(h1, h2, d1, d2, c, m), m, k, out, false);
}

void gram_sum_sym_out_cpu(at::TensorList h, at::TensorList d, at::ArrayRef<double> c,
                          c10::string_view mode, const at::Tensor& out) {
  const char* op = "gram_sum_sym_out";
  const GramMode m = parse_mode(std::string(mode), op);
  const int64_t k = check_gram_sym_inputs(op, h, d, c, m, out);
  run_cpu(canonical_layers(h, h, d, d, c, m), m, k, out, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ntk, CPU, m) {
  m.impl("gram_sum_out", &gram_sum_out_cpu);
  m.impl("gram_sum_sym_out", &gram_sum_sym_out_cpu);
}

}  // namespace torch_ntk
