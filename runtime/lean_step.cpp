// The lean decode step of a Llama-family model in one call per token (runtime/lean.py), and the module's bindings.
//
// Why: with the products on the kernel, a step of SmolLM2-135M still made ~600 small torch calls and 211 kernel calls
// from Python (about 6-8 ms of a 29-33 ms fp32 step, issue 25). Here a step is one call: per layer RMSNorm, q/k/v in
// one parallel region (int8: x quantized once for the three), RoPE of the new query and key, the key and value
// written into the next cache slot, grouped-query attention over the filled slots (split over KV heads and stretches
// of slots: attend), o_proj, residual, RMSNorm, gate and up in one region, SiLU(gate) * up, down_proj, residual, and a
// replaced run's affine map; then the final norm and the head. The math is runtime/lean.py's Python step (the
// reference the tests compare it with); the products are matvec.cpp's, on the weight views the engine set for this
// generation.
#include "matvec.h"

#include <ATen/Parallel.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace matvec {
namespace {

constexpr int64_t kMinStretch = 32;   // the fewest cache slots per attention task

#if MATVEC_AVX2
// e^x on eight floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial; relative error ~1e-7)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// x[i] = e^(x[i] - shift); returns their sum
float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#if MATVEC_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

// g[i] = silu(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i]
void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if MATVEC_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if MATVEC_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  s = hsum(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if MATVEC_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

// scores[s - s0] = q . K[s] for the slots s in [s0, s1) of K [slots, dim]. Eight slots at a time on eight independent
// accumulators: one dot product per slot is a chain of dependent FMAs, latency-bound at ~5x the throughput bound
// (attention was a fifth of an int8 step at a 512-token prompt).
void slot_scores(const float* q, const float* K, int64_t dim, int64_t s0, int64_t s1, float* scores) {
  int64_t s = s0;
#if MATVEC_AVX2
  if (dim % 8 == 0) {
    for (; s + 8 <= s1; s += 8) {
      __m256 acc[8];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(K + (s + r) * dim + d), qv, acc[r]);
      }
      // transpose-reduce: lane r of the result is the sum of acc[r]
      const __m256 a01 = _mm256_hadd_ps(acc[0], acc[1]), a23 = _mm256_hadd_ps(acc[2], acc[3]);
      const __m256 a45 = _mm256_hadd_ps(acc[4], acc[5]), a67 = _mm256_hadd_ps(acc[6], acc[7]);
      const __m256 lo = _mm256_hadd_ps(a01, a23), hi = _mm256_hadd_ps(a45, a67);
      _mm256_storeu_ps(scores + s - s0, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20),
                                                      _mm256_permute2f128_ps(lo, hi, 0x31)));
    }
  }
#endif
  for (; s < s1; ++s) scores[s - s0] = dot(q, K + s * dim, dim);
}

// out [dim] += sum_s p[s] V[s] over `count` rows of V [count, dim]; with dim a multiple of 64, each 64 columns of out
// stay in eight registers through the rows (axpy per row would store and reload them every row)
void weighted_rows(const float* p, const float* V, int64_t dim, int64_t count, float* out) {
#if MATVEC_AVX2
  if (dim % 64 == 0) {
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(out + d0 + 8 * c);
      for (int64_t s = 0; s < count; ++s) {
        const __m256 ps = _mm256_set1_ps(p[s]);
        const float* v = V + s * dim + d0;
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
    }
    return;
  }
#endif
  for (int64_t s = 0; s < count; ++s) axpy(p[s], V + s * dim, out, dim);
}

// HF's LlamaRMSNorm of one vector: out = h / sqrt(mean(h^2) + eps) * w
void rms_norm(const float* h, const torch::Tensor& w, double eps, float* out) {
  const int64_t n = w.size(0);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dot(h, h, n)) / n + eps));
  const float* wp = w.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) out[i] = h[i] * scale * wp[i];
}

// HF's RoPE of one head, x * cos + rotate_half(x) * sin, times `scale`, into out (not x)
void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float scale, float* out) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < half; ++j) {
    out[j] = (x[j] * cos[j] - x[j + half] * sin[j]) * scale;
    out[j + half] = (x[j + half] * cos[j + half] + x[j] * sin[j + half]) * scale;
  }
}

void check_vector(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous() && t.scalar_type() == torch::kFloat32 &&
                  t.device().is_cpu(),
              "LeanStep: ", what, " must be a contiguous fp32 CPU vector of ", n);
}

}  // namespace

struct Layer {
  torch::Tensor in_norm, post_norm;
  double in_eps, post_eps;
  Product q, k, v, o, gate, up, down;
  std::optional<Product> map;
  torch::Tensor keys, values;  // [kv_heads, slots, head_dim], written in place
  int64_t kv_heads, group;
};

class LeanStep {
 public:
  LeanStep(torch::Tensor embedding, torch::Tensor final_norm, double final_eps, Product head, int64_t head_dim,
           double scaling)
      : embedding_(std::move(embedding)), final_norm_(std::move(final_norm)), final_eps_(final_eps),
        head_(std::move(head)), head_dim_(head_dim), scaling_(static_cast<float>(scaling)) {
    TORCH_CHECK(embedding_.dim() == 2 && embedding_.is_contiguous() && embedding_.scalar_type() == torch::kFloat32,
                "LeanStep: the embedding must be a contiguous fp32 matrix");
    hidden_ = embedding_.size(1);
    check_vector(final_norm_, hidden_, "the final norm's weight");
    TORCH_CHECK(head_.cols() == hidden_ && head_dim_ > 0 && head_dim_ % 2 == 0,
                "LeanStep: the head must read the hidden size and head_dim must be even");
    grow(hidden_);
  }

  void add_layer(torch::Tensor in_norm, double in_eps, Product q, Product k, Product v, Product o,
                 torch::Tensor post_norm, double post_eps, Product gate, Product up, Product down,
                 std::optional<Product> map, torch::Tensor keys, torch::Tensor values) {
    const std::string at = "LeanStep layer " + std::to_string(layers_.size()) + ": ";
    check_vector(in_norm, hidden_, "an input norm's weight");
    check_vector(post_norm, hidden_, "a post-attention norm's weight");
    for (const Product* p : {&q, &k, &v, &gate, &up})
      TORCH_CHECK(p->cols() == hidden_, at, "a product reads ", p->cols(), " where the hidden size is ", hidden_);
    const int64_t kv_heads = k.rows() / head_dim_, heads = q.rows() / head_dim_;
    TORCH_CHECK(kv_heads > 0 && k.rows() == kv_heads * head_dim_ && v.rows() == k.rows() &&
                    q.rows() == heads * head_dim_ && heads % kv_heads == 0,
                at, "q/k/v of ", q.rows(), "/", k.rows(), "/", v.rows(), " rows are not whole heads of ", head_dim_);
    TORCH_CHECK(o.cols() == q.rows() && o.rows() == hidden_ && down.rows() == hidden_ && gate.rows() == up.rows() &&
                    down.cols() == gate.rows() && (!map || (map->rows() == hidden_ && map->cols() == hidden_)),
                at, "o_proj, gate/up/down or the replaced run's map do not fit the hidden size and each other");
    for (const torch::Tensor* t : {&keys, &values})
      TORCH_CHECK(t->dim() == 3 && t->size(0) == kv_heads && t->size(2) == head_dim_ && t->is_contiguous() &&
                      t->scalar_type() == torch::kFloat32 && t->sizes() == keys.sizes(),
                  at, "the K/V buffers must be contiguous fp32 [", kv_heads, ", slots, ", head_dim_, "]");
    grow(std::max({q.rows(), gate.rows()}));
    layers_.push_back(Layer{std::move(in_norm), std::move(post_norm), in_eps, post_eps, std::move(q), std::move(k),
                            std::move(v), std::move(o), std::move(gate), std::move(up), std::move(down),
                            std::move(map), std::move(keys), std::move(values), kv_heads, heads / kv_heads});
  }

  // the logits [1, vocab] of `token`, its key and value written into cache slot `slot`, attending to slots 0..slot;
  // cos/sin: the rotary embedding of its position [head_dim]
  torch::Tensor step(int64_t token, const torch::Tensor& cos, const torch::Tensor& sin, int64_t slot) {
    TORCH_CHECK(0 <= token && token < embedding_.size(0), "LeanStep: token ", token, " is not in the vocabulary");
    check_vector(cos, head_dim_, "cos");
    check_vector(sin, head_dim_, "sin");
    for (const Layer& l : layers_)
      TORCH_CHECK(0 <= slot && slot < l.keys.size(1), "LeanStep: slot ", slot, " is past the ", l.keys.size(1),
                  " slots of the cache");
    float* h = h_.data();
    std::copy_n(embedding_.data_ptr<float>() + token * hidden_, hidden_, h);
    for (const Layer& l : layers_) layer(l, cos.data_ptr<float>(), sin.data_ptr<float>(), slot);
    rms_norm(h, final_norm_, final_eps_, x_.data());
    auto logits = torch::empty({1, head_.rows()}, cos.options());
    run_products({{&head_, logits.data_ptr<float>()}}, x_.data(), hidden_);
    return logits;
  }

 private:
  void grow(int64_t n) {
    for (auto* b : {&h_, &x_, &q_, &k_, &v_, &att_, &out_, &gate_, &up_})
      if (static_cast<int64_t>(b->size()) < n) b->resize(n);
  }

  void layer(const Layer& l, const float* cos, const float* sin, int64_t slot) {
    float *h = h_.data(), *x = x_.data(), *out = out_.data();
    const int64_t heads = l.q.rows() / head_dim_, slots = l.keys.size(1);
    rms_norm(h, l.in_norm, l.in_eps, x);
    run_products({{&l.q, q_.data()}, {&l.k, k_.data()}, {&l.v, v_.data()}}, x, hidden_);
    for (int64_t i = 0; i < heads; ++i) {
      float* qi = q_.data() + i * head_dim_;
      rotate(qi, cos, sin, head_dim_, scaling_, out);
      std::copy_n(out, head_dim_, qi);
    }
    float *keys = l.keys.data_ptr<float>(), *values = l.values.data_ptr<float>();
    for (int64_t g = 0; g < l.kv_heads; ++g) {
      rotate(k_.data() + g * head_dim_, cos, sin, head_dim_, 1.f, keys + (g * slots + slot) * head_dim_);
      std::copy_n(v_.data() + g * head_dim_, head_dim_, values + (g * slots + slot) * head_dim_);
    }
    attend(l, heads, slot + 1);
    run_products({{&l.o, out}}, att_.data(), l.o.cols());
    for (int64_t i = 0; i < hidden_; ++i) h[i] += out[i];
    rms_norm(h, l.post_norm, l.post_eps, x);
    run_products({{&l.gate, gate_.data()}, {&l.up, up_.data()}}, x, hidden_);
    silu_mul(gate_.data(), up_.data(), l.gate.rows());
    run_products({{&l.down, out}}, gate_.data(), l.down.cols());
    for (int64_t i = 0; i < hidden_; ++i) h[i] += out[i];
    if (l.map) {
      run_products({{&*l.map, out}}, h, hidden_);
      std::copy_n(out, hidden_, h);
    }
  }

  // att_ [heads * head_dim] = softmax(q K^T) V per query head over the first n slots of its KV head, split as
  // flash-decoding does: tasks of (KV head, stretch of slots), each the softmax's partial max, sum and weighted sum of
  // V for the query heads of its group (every key and value row read once per group), combined after. Why split the
  // slots: a few KV heads do not spread over the threads (3 on 2 threads: 2:1), and the cache is read from memory
  // (30 layers x 2 x 3 x 544 slots x 64 floats = 25 MB per step at a 512-token prompt).
  void attend(const Layer& l, int64_t heads, int64_t n) {
    const int64_t slots = l.keys.size(1), dim = head_dim_, group = l.group;
    const int64_t want = (4 * at::get_num_threads() + l.kv_heads - 1) / l.kv_heads;
    const int64_t stretches = std::clamp<int64_t>(want, 1, (n + kMinStretch - 1) / kMinStretch);
    const int64_t stretch = (n + stretches - 1) / stretches;
    const float *keys = l.keys.data_ptr<float>(), *values = l.values.data_ptr<float>();
    // per (query head, stretch): max, sum of e^(score - max), and the e^(score - max)-weighted sum of V [dim]
    partial_max_.assign(heads * stretches, -std::numeric_limits<float>::infinity());
    partial_sum_.assign(heads * stretches, 0.f);
    partial_out_.assign(heads * stretches * dim, 0.f);
    parallel_tasks(l.kv_heads * stretches, [&](int64_t t) {
      const int64_t g = t / stretches, c = t % stretches, s0 = c * stretch, s1 = std::min(n, s0 + stretch);
      if (s0 >= s1) return;
      const float *K = keys + g * slots * dim, *V = values + g * slots * dim;
      std::vector<float> scores(s1 - s0);
      for (int64_t j = 0; j < group; ++j) {
        const int64_t i = g * group + j;
        float* sc = scores.data();
        slot_scores(q_.data() + i * dim, K, dim, s0, s1, sc);
        const float top = *std::max_element(sc, sc + (s1 - s0));
        partial_max_[i * stretches + c] = top;
        partial_sum_[i * stretches + c] = exp_shifted(sc, s1 - s0, top);
        weighted_rows(sc, V + s0 * dim, dim, s1 - s0, partial_out_.data() + (i * stretches + c) * dim);
      }
    });
    for (int64_t i = 0; i < heads; ++i) {
      const float* m = partial_max_.data() + i * stretches;
      const float top = *std::max_element(m, m + stretches);
      float* out = att_.data() + i * dim;
      std::fill_n(out, dim, 0.f);
      float total = 0.f;
      for (int64_t c = 0; c < stretches; ++c) {
        if (partial_sum_[i * stretches + c] == 0.f) continue;       // an empty stretch
        const float w = std::exp(m[c] - top);
        total += w * partial_sum_[i * stretches + c];
        axpy(w, partial_out_.data() + (i * stretches + c) * dim, out, dim);
      }
      for (int64_t j = 0; j < dim; ++j) out[j] /= total;
    }
  }

  torch::Tensor embedding_, final_norm_;
  double final_eps_;
  Product head_;
  int64_t head_dim_, hidden_;
  float scaling_;
  std::vector<Layer> layers_;
  std::vector<float> h_, x_, q_, k_, v_, att_, out_, gate_, up_, partial_max_, partial_sum_, partial_out_;
};

}  // namespace matvec

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using matvec::Product;
  py::class_<Product>(m, "Product", "One Linear's one-row product on its current weight view (matvec.h).")
      .def(py::init<torch::Tensor, std::optional<torch::Tensor>, int64_t, int64_t, std::optional<torch::Tensor>>(),
           py::arg("w"), py::arg("scale") = py::none(), py::arg("rows") = -1, py::arg("cols") = -1,
           py::arg("bias") = py::none())
      .def("__call__", &Product::operator(), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("shape", [](const Product& p) { return std::make_pair(p.rows(), p.cols()); });
  py::class_<matvec::LeanStep>(m, "LeanStep", "A Llama decode step in one call (lean_step.cpp).")
      .def(py::init<torch::Tensor, torch::Tensor, double, Product, int64_t, double>(), py::arg("embedding"),
           py::arg("final_norm"), py::arg("final_eps"), py::arg("head"), py::arg("head_dim"), py::arg("scaling"))
      .def("add_layer", &matvec::LeanStep::add_layer)
      .def("__call__", &matvec::LeanStep::step, py::call_guard<py::gil_scoped_release>());
  m.def("vectorized", []() { return bool(MATVEC_AVX2); });
}
