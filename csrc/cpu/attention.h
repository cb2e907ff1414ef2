// Flash-style attention on CPU: softmax(scale * Q K^T) V without the L x L matrix.
// fastdiff/ops/attention.py validates every argument; these kernels assume valid input.
#pragma once
#include <cstdint>

namespace fastdiff {

// Strides are in elements, for the (batch, head, position) dims; the head dim is dense.
struct AttentionArgs {
  const void* q;  // in,  (B, H, Lq, D), strides q_stride
  const void* k;  // in,  (B, H, Lk, D), strides k_stride
  const void* v;  // in,  (B, H, Lk, D), strides v_stride
  void* out;      // out, (B, H, Lq, D), contiguous
  float* lse;     // out, (B, H, Lq) log-sum-exp of the scaled scores, saved for backward
  int64_t batch, heads, len_q, len_k, head_dim;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  float scale;
  int dtype;  // dtypes.h code of q, k, v, out: kFloat32 or kBFloat16
  int num_threads;
};

struct AttentionBackwardArgs {
  const void* grad_out;  // in,  (B, H, Lq, D), strides grad_out_stride
  const void* q;         // in,  (B, H, Lq, D), strides q_stride
  const void* k;         // in,  (B, H, Lk, D), strides k_stride
  const void* v;         // in,  (B, H, Lk, D), strides v_stride
  const void* out;       // in,  (B, H, Lq, D), contiguous (the forward's output)
  const float* lse;      // in,  (B, H, Lq)
  void* grad_q;          // out, (B, H, Lq, D), contiguous
  void* grad_k;          // out, (B, H, Lk, D), contiguous
  void* grad_v;          // out, (B, H, Lk, D), contiguous
  int64_t batch, heads, len_q, len_k, head_dim;
  int64_t grad_out_stride[3], q_stride[3], k_stride[3], v_stride[3];
  float scale;
  int dtype;
  int num_threads;
};

void attention_forward_cpu(const AttentionArgs& args);
void attention_backward_cpu(const AttentionBackwardArgs& args);

}  // namespace fastdiff
