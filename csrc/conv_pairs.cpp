// Schemas of the conv_pairs and pool_pairs ops (csrc/conv_pairs.h); kernels in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torch_ntk, m) {
  m.def(
      "conv_pairs(Tensor k, Tensor? t, Tensor s1, Tensor s2, int[] kernel, int[] stride, "
      "int[] dilation, int[] pad, int[] out_size, bool full, bool ntk, float w2, float b2, "
      "str act, float slope) -> (Tensor, Tensor)");
  // Average pooling of the full position-pair layout: the mean over every pair of window
  // offsets (d, e), k[s u + d, s u' + e], no padding; t None gives an empty NTK.
  m.def(
      "pool_pairs(Tensor k, Tensor? t, int[] kernel, int[] stride, int[] out_size) -> "
      "(Tensor, Tensor)");
}
