// One-row matrix-vector products for decode, multi-threaded on the kernel's task pool (tasks.cpp; runtime/matvec.py).
//
// The kernels read the weight in place through its strides, so the engine's prefix views (a row prefix of
// q/k/v/gate/up, a column prefix of o_proj/down_proj) need no copy per view (matvec.h lists the layouts):
//   fp32: y[n] = sum_k W[n, k] x[k], W row-major (stride(1) == 1) or column-major (stride(0) == 1);
//   int8: y[n] = scale[n] * sum_k W[n, k] x[k], W row-major or in column blocks (runtime.dtype.column_blocks, for
//         column prefixes), fp32 scales; x is quantized to int16 per block of kQBlock columns (scale max|x| / 32767
//         per block: relative error ~2e-5 of the output) and the products run on int16 multiply-adds
//         (madd_epi16), accumulated in int32 per block.
// Output rows are split into tasks over torch's thread count (parallel_tasks); each task streams its rows once.
// The int8 kernels prefetch kPrefetchRows rows ahead: an int8 row is a few hundred bytes, too short for the hardware
// prefetcher to ramp up on, and without it int8 read 10-14 GB/s cold against fp32's 25 (with it 16-32; bench numbers
// in bench/RESULTS.md). Why int16 activations: the int8 -> fp32 conversion made the product compute-heavy enough
// that memory and compute did not overlap; int16 products need a third of the instructions.
#include "matvec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace matvec {
namespace {

constexpr int64_t kRows = 4;      // rows per inner loop of the row-major kernels: four dot products share each x load
constexpr int64_t kRowTask = 16;  // rows per task of the row-major products (fp32: 36 KB of SmolLM2's rows)
constexpr int64_t kI8RowTask = 64;  // int8 rows are a quarter as long: tasks of about as many bytes
constexpr int64_t kCols = 32;     // outputs per column-major task: four 8-float accumulators
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kBlockedRows = 96;   // the most rows per task of the column-block product
#if MATVEC_AVX2
// sum of W[k] * x[k] over 16 int8 weights and int16 activations, as eight int32 lanes added to acc
inline __m256i madd16(const int8_t* w, const int16_t* x, __m256i acc) {
  const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
}

inline void prefetch_rows(const int8_t* p, int64_t ld) {
  for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(p + i * ld), _MM_HINT_T0);
}
#endif

// rows [n0, n0 + count) of a row-major fp32 W, leading dimension ld
void rows_f32(const float* W, int64_t ld, const float* x, int64_t K, float* y, int64_t n0, int64_t count) {
  int64_t n = n0;
#if MATVEC_AVX2
  for (; n + kRows <= n0 + count; n += kRows) {
    const float* r0 = W + n * ld;
    const float* r1 = r0 + ld;
    const float* r2 = r1 + ld;
    const float* r3 = r2 + ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + k), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + k), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + k), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + k), xv, a3);
    }
    float s[kRows] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (; k < K; ++k) {
      s[0] += r0[k] * x[k];
      s[1] += r1[k] * x[k];
      s[2] += r2[k] * x[k];
      s[3] += r3[k] * x[k];
    }
    for (int64_t i = 0; i < kRows; ++i) y[n + i] = s[i];
  }
#endif
  for (; n < n0 + count; ++n) {
    const float* r = W + n * ld;
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += r[k] * x[k];
    y[n] = s;
  }
}

// the end of the activation block that column kb of a product starting at global column k0 lies in, within K
inline int64_t block_end(int64_t k0, int64_t kb, int64_t K) {
  return std::min(K, ((k0 + kb) / kQBlock + 1) * kQBlock - k0);
}

// rows [n0, n0 + count) of int8 W (leading dimension ld) times x quantized (columns k0 .. k0 + K of it: W may be
// one column block of a wider product), y = or += the fp32 sums; scales per row applied by the caller
template <bool kAdd>
void rows_i8(const int8_t* W, int64_t ld, const QuantizedVector& xq, int64_t k0, int64_t K, float* y, int64_t n0,
             int64_t count) {
  const int16_t* x = xq.q.data() + k0;
  const float* xs = xq.s.data();
  int64_t n = n0;
#if MATVEC_AVX2
  for (; n + kRows <= n0 + count; n += kRows) {
    const int8_t* r[kRows] = {W + n * ld, W + (n + 1) * ld, W + (n + 2) * ld, W + (n + 3) * ld};
    float acc[kRows] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t kb = 0; kb < K;) {       // one activation block at a time (its boundaries are global columns)
      const int64_t ke = block_end(k0, kb, K);
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
      int64_t k = kb;
      for (; k + 16 <= ke; k += 16) {
        if ((k & 63) == 0) prefetch_rows(r[0] + kPrefetchRows * ld + k, ld);
        s0 = madd16(r[0] + k, x + k, s0);
        s1 = madd16(r[1] + k, x + k, s1);
        s2 = madd16(r[2] + k, x + k, s2);
        s3 = madd16(r[3] + k, x + k, s3);
      }
      // the block's sum in int32 first (exact: < kQBlock * 127 * 32767 < 2^31), then one conversion: converting
      // the eight lanes would round each, and lanes that cancel leave that rounding in a small sum
      int32_t sum[kRows] = {hsum_epi32(s0), hsum_epi32(s1), hsum_epi32(s2), hsum_epi32(s3)};
      for (; k < ke; ++k)
        for (int64_t i = 0; i < kRows; ++i) sum[i] += r[i][k] * x[k];
      const float scale = xs[(k0 + kb) / kQBlock];
      for (int64_t i = 0; i < kRows; ++i) acc[i] += static_cast<float>(sum[i]) * scale;
      kb = ke;
    }
    for (int64_t i = 0; i < kRows; ++i) y[n + i] = (kAdd ? y[n + i] : 0.f) + acc[i];
  }
#endif
  for (; n < n0 + count; ++n) {
    const int8_t* r = W + n * ld;
    float s = 0.f;
    for (int64_t kb = 0; kb < K;) {
      const int64_t ke = block_end(k0, kb, K);
      int32_t block = 0;
      for (int64_t k = kb; k < ke; ++k) block += r[k] * x[k];
      s += block * xs[(k0 + kb) / kQBlock];
      kb = ke;
    }
    y[n] = (kAdd ? y[n] : 0.f) + s;
  }
}

// outputs [n0, n0 + count) of a column-major fp32 W (element (n, k) at k * ld + n)
void cols_f32(const float* W, int64_t ld, const float* x, int64_t K, float* y, int64_t n0, int64_t count) {
#if MATVEC_AVX2
  if (count == kCols) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; ++k) {
      const float* c = W + k * ld + n0;
      const __m256 xk = _mm256_set1_ps(x[k]);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(c), xk, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(c + 8), xk, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(c + 16), xk, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(c + 24), xk, a3);
    }
    _mm256_storeu_ps(y + n0, a0);
    _mm256_storeu_ps(y + n0 + 8, a1);
    _mm256_storeu_ps(y + n0 + 16, a2);
    _mm256_storeu_ps(y + n0 + 24, a3);
    return;
  }
#endif
  std::fill(y + n0, y + n0 + count, 0.f);
  for (int64_t k = 0; k < K; ++k) {
    const float* c = W + k * ld;
    for (int64_t n = n0; n < n0 + count; ++n) y[n] += c[n] * x[k];
  }
}

}  // namespace

QuantizedVector quantize_int16(const float* x, int64_t K) {
  QuantizedVector v{std::vector<int16_t>(K), std::vector<float>((K + kQBlock - 1) / kQBlock)};
  for (int64_t kb = 0; kb < K; kb += kQBlock) {
    const int64_t ke = std::min(K, kb + kQBlock);
    float m = 0.f;
    for (int64_t k = kb; k < ke; ++k) m = std::max(m, std::fabs(x[k]));
    const float s = m > 0.f ? m / 32767.f : 1.f;
    v.s[kb / kQBlock] = s;
    for (int64_t k = kb; k < ke; ++k) v.q[k] = static_cast<int16_t>(std::nearbyint(x[k] / s));
  }
  return v;
}

Product::Product(torch::Tensor w, std::optional<torch::Tensor> scale, int64_t rows, int64_t cols,
                 std::optional<torch::Tensor> bias)
    : w_(std::move(w)) {
  TORCH_CHECK(w_.device().is_cpu() && (w_.scalar_type() == torch::kFloat32 || w_.scalar_type() == torch::kInt8),
              "Product: w must be an fp32 or int8 CPU tensor");
  if (w_.scalar_type() == torch::kFloat32) {
    TORCH_CHECK(w_.dim() == 2 && !scale, "Product: an fp32 w is 2-D and takes no scale");
    N_ = w_.size(0);
    K_ = w_.size(1);
    if (w_.stride(1) == 1 || K_ == 1) {
      kind_ = Kind::F32Rows;
      ld_ = w_.stride(0);
    } else {
      TORCH_CHECK(w_.stride(0) == 1, "Product: w must be row- or column-major (a prefix view of either)");
      kind_ = Kind::F32Cols;
      ld_ = w_.stride(1);
    }
  } else if (w_.dim() == 2) {
    TORCH_CHECK(w_.stride(1) == 1, "Product: an int8 w must be row-major (a row or column prefix view of one)");
    kind_ = Kind::I8Rows;
    N_ = w_.size(0);
    K_ = w_.size(1);
    ld_ = w_.stride(0);
  } else {
    TORCH_CHECK(w_.dim() == 3 && w_.is_contiguous(),
                "Product: int8 column blocks must be a contiguous 3-D tensor [blocks, rows, block width]");
    kind_ = Kind::I8Blocks;
    N_ = rows;
    K_ = cols;
    ld_ = w_.size(2);
    block_stride_ = w_.size(1) * ld_;
    TORCH_CHECK(0 < N_ && N_ <= w_.size(1) && 0 < K_ && K_ <= w_.size(0) * ld_, "Product: ", N_, " rows and ", K_,
                " columns do not fit a weight of ", w_.size(1), " rows and ", w_.size(0) * ld_, " columns");
  }
  TORCH_CHECK((rows < 0 || rows == N_) && (cols < 0 || cols == K_), "Product: ", rows, " rows and ", cols,
              " columns asked of a ", N_, " x ", K_, " weight");
  data_ = w_.data_ptr();
  if (int8()) {
    TORCH_CHECK(scale && scale->dim() == 1 && scale->size(0) >= N_ && scale->is_contiguous() &&
                    scale->scalar_type() == torch::kFloat32,
                "Product: an int8 w needs a contiguous fp32 scale of at least its ", N_, " rows");
    scale_ = *scale;
    scale_ptr_ = scale_.data_ptr<float>();
  }
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N_ && bias->is_contiguous() &&
                    bias->scalar_type() == torch::kFloat32,
                "Product: bias must be a contiguous fp32 vector of the product's ", N_, " rows");
    bias_ = *bias;
    bias_ptr_ = bias_.data_ptr<float>();
  }
}

int64_t Product::task_rows(int64_t threads) const {
  switch (kind_) {
    case Kind::F32Cols:
      return kCols;
    case Kind::I8Blocks:
      // a task reads each block's share as one stretch of rows x B bytes; 16-row stretches (4 KB) left the product at
      // 0.94 of the full row-major one for 0.8 of its bytes, 96 rows reached 0.77 (576 x 1536, 1229 columns, 2
      // threads). At least two tasks per thread, so wide machines still split small weights.
      return std::clamp<int64_t>(N_ / (2 * threads) / kRows * kRows, kRowTask, kBlockedRows);
    case Kind::I8Rows:
      return kI8RowTask;
    default:
      return kRowTask;
  }
}

void Product::run(int64_t n0, int64_t count, const float* x, const QuantizedVector* xq, float* y) const {
  switch (kind_) {
    case Kind::F32Rows:
      rows_f32(static_cast<const float*>(data_), ld_, x, K_, y, n0, count);
      break;
    case Kind::F32Cols:
      cols_f32(static_cast<const float*>(data_), ld_, x, K_, y, n0, count);
      break;
    case Kind::I8Rows:
      rows_i8<false>(static_cast<const int8_t*>(data_), ld_, *xq, 0, K_, y, n0, count);
      break;
    case Kind::I8Blocks: {
      const int8_t* W = static_cast<const int8_t*>(data_);
      for (int64_t kb = 0; kb < K_; kb += ld_) {
        const int8_t* block = W + (kb / ld_) * block_stride_;
        const int64_t width = std::min(ld_, K_ - kb);
        if (kb == 0) {
          rows_i8<false>(block, ld_, *xq, kb, width, y, n0, count);
        } else {
          rows_i8<true>(block, ld_, *xq, kb, width, y, n0, count);
        }
      }
      break;
    }
  }
  if (scale_ptr_ != nullptr)
    for (int64_t n = n0; n < n0 + count; ++n) y[n] *= scale_ptr_[n];
  if (bias_ptr_ != nullptr)
    for (int64_t n = n0; n < n0 + count; ++n) y[n] += bias_ptr_[n];
}

void run_products(const std::vector<std::pair<const Product*, float*>>& jobs, const float* x, int64_t K) {
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> width(jobs.size()), first(jobs.size() + 1, 0);
  bool int8 = false;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const Product& p = *jobs[j].first;
    TORCH_CHECK(p.cols() == K, "run_products: a product of ", p.cols(), " columns on a vector of ", K);
    width[j] = p.task_rows(threads);
    first[j + 1] = first[j] + (p.rows() + width[j] - 1) / width[j];
    int8 |= p.int8();
  }
  const QuantizedVector xq = int8 ? quantize_int16(x, K) : QuantizedVector{};
  parallel_tasks(first.back(), [&](int64_t t) {
    const size_t j = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const Product& p = *jobs[j].first;
    const int64_t n0 = (t - first[j]) * width[j];
    p.run(n0, std::min(width[j], p.rows() - n0), x, &xq, jobs[j].second);
  });
}

torch::Tensor Product::operator()(const torch::Tensor& x) const {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == K_ && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "Product: x must be a contiguous fp32 vector of the weight's ", K_, " columns");
  auto y = torch::empty({N_}, x.options());
  run_products({{this, y.data_ptr<float>()}}, x.data_ptr<float>(), K_);
  return y;
}

}  // namespace matvec
