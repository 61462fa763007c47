// Schema of the conv_pairs op (csrc/conv_pairs.h); kernels in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torch_ntk, m) {
  m.def(
      "conv_pairs(Tensor k, Tensor? t, Tensor s1, Tensor s2, int[] kernel, int[] stride, "
      "int[] dilation, int[] pad, int[] out_size, bool full, bool ntk, float w2, float b2, "
      "str act, float slope) -> (Tensor, Tensor)");
}
