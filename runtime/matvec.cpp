// One-row matrix-vector products for decode, multi-threaded on torch's own OpenMP pool (runtime/matvec.py).
//
// The kernels read the weight in place through its strides, so the engine's prefix views (a row prefix of
// q/k/v/gate/up, a column prefix of o_proj/down_proj) need no copy per view:
//   matvec_f32: y[n] = sum_k W[n, k] x[k], W fp32 row-major (stride(1) == 1) or column-major (stride(0) == 1);
//   matvec_i8:  y[n] = scale[n] * sum_k W[n, k] x[k], W int8 row-major, fp32 scales; x is quantized to int16
//               per block of kQBlock columns (scale max|x| / 32767 per block: relative error ~2e-5 of the output)
//               and the products run on int16 multiply-adds (madd_epi16), accumulated in int32 per block;
//   matvec_i8_blocked: the same on W stored in column blocks (runtime.dtype.column_blocks), for column prefixes.
// Output rows are split across at::parallel_for's threads; each thread streams its rows once. The int8 kernels
// prefetch kPrefetchRows rows ahead: an int8 row is a few hundred bytes, too short for the hardware prefetcher to
// ramp up on, and without it int8 read 10-14 GB/s cold against fp32's 25 (with it 16-32; bench numbers in
// bench/RESULTS.md). Why int16 activations: the int8 -> fp32 conversion made the product compute-heavy enough
// that memory and compute did not overlap; int16 products need a third of the instructions.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MATVEC_AVX2 1
#else
#define MATVEC_AVX2 0
#endif

namespace {

constexpr int64_t kRows = 4;      // rows per row-major task: four dot products share each load of x
constexpr int64_t kCols = 32;     // outputs per column-major task: four 8-float accumulators
constexpr int64_t kQBlock = 256;  // columns per int16 activation scale (and per int32 partial sum: no overflow)
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kBlockedRows = 96;   // the most rows per task of the column-block product (matvec_i8_blocked)

#if MATVEC_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

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
void rows(const float* W, int64_t ld, const float* x, int64_t K, float* y, int64_t n0, int64_t count) {
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

// x quantized to int16 per kQBlock columns: q[k] = round(x[k] / s[k / kQBlock]), s = max|x| / 32767 per block
struct QuantizedVector {
  std::vector<int16_t> q;
  std::vector<float> s;
};

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

void check_vector(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == K && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "matvec: x must be a contiguous fp32 vector of the weight's ", K, " columns");
}

// split `blocks` tasks of `width` outputs over the pool; `run(n0, count)` computes one task
template <typename F>
void over_blocks(int64_t N, int64_t width, const F& run) {
  const int64_t blocks = (N + width - 1) / width;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) run(b * width, std::min(width, N - b * width));
  });
}

torch::Tensor matvec_f32(const torch::Tensor& w, const torch::Tensor& x) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.device().is_cpu(),
              "matvec_f32: w must be a 2-D fp32 CPU tensor");
  const int64_t N = w.size(0), K = w.size(1);
  check_vector(x, K);
  auto y = torch::empty({N}, x.options());
  const float* W = w.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  if (w.stride(1) == 1 || K == 1) {
    const int64_t ld = w.stride(0);
    over_blocks(N, 4 * kRows, [&](int64_t n0, int64_t count) { rows(W, ld, X, K, Y, n0, count); });
  } else {
    TORCH_CHECK(w.stride(0) == 1, "matvec_f32: w must be row- or column-major (a prefix view of either)");
    const int64_t ld = w.stride(1);
    over_blocks(N, kCols, [&](int64_t n0, int64_t count) { cols_f32(W, ld, X, K, Y, n0, count); });
  }
  return y;
}

// the operands of an int8 product of N rows and K columns, checked, and its output
struct Int8Product {
  torch::Tensor y;
  const float* scale;
  QuantizedVector x;
  float* out;
};

Int8Product int8_product(const torch::Tensor& scale, const torch::Tensor& x, int64_t N, int64_t K,
                         const char* name) {
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) >= N && scale.is_contiguous() &&
                  scale.scalar_type() == torch::kFloat32,
              name, ": scale must be a contiguous fp32 vector of at least the rows asked for");
  check_vector(x, K);
  auto y = torch::empty({N}, x.options());
  return {y, scale.data_ptr<float>(), quantize_int16(x.data_ptr<float>(), K), y.data_ptr<float>()};
}

torch::Tensor matvec_i8(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& x) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.device().is_cpu() && w.stride(1) == 1,
              "matvec_i8: w must be a row-major 2-D int8 CPU tensor (a row or column prefix view of one)");
  const int64_t N = w.size(0), K = w.size(1), ld = w.stride(0);
  const Int8Product p = int8_product(scale, x, N, K, "matvec_i8");
  const int8_t* W = w.data_ptr<int8_t>();
  over_blocks(N, 4 * kRows, [&](int64_t n0, int64_t count) {
    rows_i8<false>(W, ld, p.x, 0, K, p.out, n0, count);
    for (int64_t n = n0; n < n0 + count; ++n) p.out[n] *= p.scale[n];
  });
  return p.y;
}

// y = scale[:rows] * W[:rows, :K] x with W int8 in column blocks [blocks, rows_full, B] (runtime.dtype's layout for
// column prefixes: a prefix of K columns reads only the first ceil(K / B) blocks); K = x's length
torch::Tensor matvec_i8_blocked(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& x,
                                int64_t rows_) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kInt8 && w.device().is_cpu() && w.is_contiguous(),
              "matvec_i8_blocked: w must be a contiguous 3-D int8 CPU tensor [blocks, rows, block width]");
  const int64_t B = w.size(2), N = rows_, K = x.size(0), bstride = w.size(1) * B;
  TORCH_CHECK(0 < N && N <= w.size(1) && 0 < K && K <= w.size(0) * B,
              "matvec_i8_blocked: ", N, " rows and ", K, " columns do not fit a weight of ", w.size(1), " rows and ",
              w.size(0) * B, " columns");
  const Int8Product p = int8_product(scale, x, N, K, "matvec_i8_blocked");
  const int8_t* W = w.data_ptr<int8_t>();
  // each task runs its rows through every block it needs, adding up, then scales them. Tasks are taller than the
  // row-major path's: a task reads each block's share as one stretch of rows x B bytes, and 16-row stretches (4 KB)
  // left the product at 0.94 of the full row-major one for 0.8 of its bytes; 96 rows reached 0.77 (576 x 1536,
  // 1229 columns, 2 threads). At least two tasks per thread, so wide machines still split small weights.
  const int64_t task = std::clamp<int64_t>(N / (2 * at::get_num_threads()) / kRows * kRows, 4 * kRows, kBlockedRows);
  over_blocks(N, task, [&](int64_t n0, int64_t count) {
    for (int64_t kb = 0; kb < K; kb += B) {
      const int8_t* block = W + (kb / B) * bstride;
      const int64_t width = std::min(B, K - kb);
      if (kb == 0) {
        rows_i8<false>(block, B, p.x, kb, width, p.out, n0, count);
      } else {
        rows_i8<true>(block, B, p.x, kb, width, p.out, n0, count);
      }
    }
    for (int64_t n = n0; n < n0 + count; ++n) p.out[n] *= p.scale[n];
  });
  return p.y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matvec_f32", &matvec_f32, py::call_guard<py::gil_scoped_release>());
  m.def("matvec_i8", &matvec_i8, py::call_guard<py::gil_scoped_release>());
  m.def("matvec_i8_blocked", &matvec_i8_blocked, py::call_guard<py::gil_scoped_release>());
  m.def("vectorized", []() { return bool(MATVEC_AVX2); });
}
