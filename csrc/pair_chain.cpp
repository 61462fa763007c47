// Schema of the pair_chain op (csrc/pair_chain.h); kernels in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torch_ntk, m) {
  m.def(
      "pair_chain(Tensor k, Tensor? t, Tensor[] s1, Tensor[] s2, int[] steps, float[] scales, "
      "bool full, bool ntk) -> (Tensor, Tensor)");
}
