// The decode kernel's shared declarations: one-row products (matvec.cpp) and the fused lean step (lean_step.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MATVEC_AVX2 1
#else
#define MATVEC_AVX2 0
#endif

namespace matvec {

#if MATVEC_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

constexpr int64_t kQBlock = 256;  // columns per int16 activation scale (and per int32 partial sum: no overflow)

// x quantized to int16 per kQBlock columns: q[k] = round(x[k] / s[k / kQBlock]), s = max|x| / 32767 per block
struct QuantizedVector {
  std::vector<int16_t> q;
  std::vector<float> s;
};

QuantizedVector quantize_int16(const float* x, int64_t K);

// One Linear's product for the weight view it holds now, y = W x (+ bias), read in place:
//   F32Rows:  fp32 W row-major (stride(1) == 1), a row and/or column prefix view of the full weight;
//   F32Cols:  fp32 W column-major (stride(0) == 1);
//   I8Rows:   int8 W row-major, fp32 scale per row: y[n] = scale[n] * sum_k W[n, k] x[k] on int16 activations;
//   I8Blocks: the same on W stored in column blocks [blocks, rows_full, B] (runtime.dtype.column_blocks), of which
//             the first `rows` rows and `cols` columns are the product's.
// Work is split into tasks of whole output rows so that several products on one input can share a parallel region
// (run_products) and each task streams its rows once.
class Product {
 public:
  enum class Kind { F32Rows, F32Cols, I8Rows, I8Blocks };

  Product(torch::Tensor w, std::optional<torch::Tensor> scale, int64_t rows, int64_t cols,
          std::optional<torch::Tensor> bias);

  int64_t rows() const { return N_; }
  int64_t cols() const { return K_; }
  bool int8() const { return kind_ == Kind::I8Rows || kind_ == Kind::I8Blocks; }
  // output rows per task on `threads` threads
  int64_t task_rows(int64_t threads) const;
  // y[n0, n0 + count) of the product (scale and bias applied); xq is x quantized where int8()
  void run(int64_t n0, int64_t count, const float* x, const QuantizedVector* xq, float* y) const;
  // x [cols] -> y [rows], on parallel_tasks
  torch::Tensor operator()(const torch::Tensor& x) const;

 private:
  Kind kind_;
  torch::Tensor w_, scale_, bias_;  // held so the views outlive the Python objects they came from
  const void* data_ = nullptr;      // w_'s first element: data_ptr<T>() checks the type on every call (perf: ~2 %)
  int64_t N_, K_, ld_, block_stride_;
  const float* scale_ptr_ = nullptr;
  const float* bias_ptr_ = nullptr;
};

// several products on one input x (all of x's length), each into its output, in one parallel region
void run_products(const std::vector<std::pair<const Product*, float*>>& jobs, const float* x, int64_t K);

// task(i) for every i in [0, count) on torch's thread count (tasks.cpp: the kernel's own pool, not OpenMP's): each
// thread starts on its own contiguous share, in order (its rows stream as one), and a thread whose share is done
// takes the back half of the largest share left. Why not a static split: with one thread waiting for the other at the
// end of every region, perf put 8-22 % of each thread's time of a step in libgomp's spin (the machine's bandwidth
// per thread varies moment to moment). It returns when every task is done, without waiting for a worker to arrive.
void parallel_tasks(int64_t count, const std::function<void(int64_t)>& task);

}  // namespace matvec
