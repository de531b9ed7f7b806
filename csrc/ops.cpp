// The schema of every kernel op lives here; the implementations register themselves per backend
// (CPU in csrc/*.cpp, CUDA in csrc/cuda/*.cu). The three ops that choose the CPU kernel variant
// (cpu_capability, supported_cpu_capabilities, set_cpu_capability) are defined together with
// their implementation in csrc/cpu_dispatch.cpp: they take no tensor, so there is nothing to
// dispatch per backend. The Python wrappers in icpo/ops/ validate inputs, build group offsets and
// attach autograd; these ops check again what memory safety needs (checks.h).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing icpo._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(icpo, m) {
  // logits [T, V] (row stride free, unit column stride), labels int64 [T].
  // Returns (logp [T] f32, entropy [T] f32, lse [T] f32) of softmax(logits * inv_temperature).
  // Rows whose label == ignore_index give logp = entropy = 0 (lse is still computed).
  // A row holding NaN or +-inf gives lse = NaN so the caller can report it.
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float inv_temperature, int ignore_index)"
        " -> (Tensor, Tensor, Tensor)");
  // grad_logits = inv_temperature * (g_logp * (onehot(label) - p) - g_entropy * p * (log p + H)),
  // written in logits' dtype; zero on ignored rows.
  m.def("token_logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels,"
        " Tensor lse, Tensor entropy, float inv_temperature, int ignore_index) -> Tensor");
  // hidden [T, H], weight [V, H], bias [V] or None (one float dtype), labels int64 [T]: as
  // token_logprobs_fwd on logits = hidden @ weight^T + bias, which are never held whole: they
  // are made in tiles in a buffer of chunk_size * V elements (0: a fixed size per device).
  // -> (logp, entropy, lse).
  m.def("linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels,"
        " float inv_temperature, int ignore_index, int chunk_size) -> (Tensor, Tensor, Tensor)");
  // -> (grad_hidden, grad_weight, grad_bias) in hidden's dtype, recomputing the logits tile by
  // tile; an output whose output_mask entry is false (grad_bias also without a bias) is an empty
  // [0] tensor.
  m.def("linear_token_logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor hidden,"
        " Tensor weight, Tensor? bias, Tensor labels, Tensor lse, Tensor entropy,"
        " float inv_temperature, int ignore_index, int chunk_size, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");
  // values [T] float, cu_seqlens int32/int64 [B+1] -> [B] means, values' dtype.
  m.def("segment_mean(Tensor values, Tensor cu_seqlens) -> Tensor");
  // grad [B] -> [T]: grad[b] / len_b on every position of segment b.
  m.def("segment_mean_bwd(Tensor grad, Tensor cu_seqlens, SymInt total) -> Tensor");
  // confidence [N] (<= 0), group_offsets int64 [G+1] -> S [N] (docs/algorithm.md step 5, Eq. 9).
  m.def("preference_scores(Tensor confidence, Tensor group_offsets, float delta) -> Tensor");
  // docs/algorithm.md steps 4-7 fused: -> (scores [N], final rewards [N], advantages [N]).
  m.def("icpo_advantages(Tensor confidence, Tensor rewards, Tensor group_offsets, float delta,"
        " float tau, float omega, bool scale, bool unbiased, float eps) -> (Tensor, Tensor, Tensor)");
  // Group-normalized advantages of rewards [N] (Eq. 5); a group of one gets 0.
  m.def("grpo_advantages(Tensor rewards, Tensor group_offsets, bool scale, bool unbiased, float eps)"
        " -> Tensor");
}
