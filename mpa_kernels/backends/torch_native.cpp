// Native loops of the "torch" backend's chunk sweep (mpa_kernels/backends/torch_chunked.py).
//
// Between its GEMMs, a chunk of classes costs the eager sweep some ten passes over the chunk's
// similarities (n x m classes x k proxies), each an ATen op of its own that reads and writes the
// whole chunk and costs a dispatch. Here the same arithmetic is one pass per visit:
//
//   visit_forward:  the GEMM's output -> J = Z dS/ds (in place or beside it; none where S is s
//                   itself), the negative logits z = alpha (S + delta) with -inf at each row's
//                   positive, 1/Z, and for the row-wise family the rows' online log-sum-exp
//                   over the chunks seen so far.
//   column_lse:     a class's log-sum-exp over the rows with a zero logit (the column-wise family).
//   chunk_gradient: dL/dS = exp(z - a_i - b_c) r_i q_c at the negatives and the given value at
//                   each row's positive, then ds = J dL/dS / Z scaled by the proxies' inverse
//                   norms, and the column sums of ds times the GEMM's output (the projection's dot).
//
// The formulas are those of the eager code, which derives them; the eager code stays the fallback
// where these cannot be built, and the tests hold the two to each other and to the reference.
// Everything is computed in the inputs' dtype (float or double), in the eager code's order where
// it matters for precision: t - (h - 1) before the product with e.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <utility>
#include <optional>
#include <vector>

namespace {

using at::vec::Vectorized;

enum Similarity : int64_t { kIdentity = 0, kSoftmax = 1, kMax = 2 };

template <typename T>
T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// out[0, n) = exp(in[0, n)), vectorised; in and out may be the same.
template <typename T>
void exp_into(const T* in, T* out, int64_t n) {
  using V = Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) V::loadu(in + i).exp().store(out + i);
  if (i < n) V::loadu(in + i, n - i).exp().store(out + i, n - i);
}

template <typename T>
T lane_sum(const Vectorized<T>& a) {
  T lanes[Vectorized<T>::size()];
  a.store(lanes);
  T out = 0;
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) out += lanes[l];
  return out;
}

// max and sum of a[0, n), vectorised (a float reduction in one register would be one chain of
// dependent adds: four cycles an element). The max propagates a NaN, as torch.amax does.
template <typename T>
T max_of(const T* a, int64_t n, T init) {
  using V = Vectorized<T>;
  V top(init);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) top = at::vec::maximum(top, V::loadu(a + i));
  T lanes[V::size()];
  top.store(lanes);
  T out = init;
  for (int64_t l = 0; l < V::size(); ++l) out = std::isnan(lanes[l]) ? lanes[l] : std::max(out, lanes[l]);
  for (; i < n; ++i) out = std::isnan(a[i]) ? a[i] : std::max(out, a[i]);
  return out;
}

// sum of exp(a[0, n) - shift), in one vectorised pass.
template <typename T>
T sum_exp_shifted(const T* a, int64_t n, T shift) {
  using V = Vectorized<T>;
  const V vs(shift);
  V acc(T(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) acc = acc + (V::loadu(a + i) - vs).exp();
  T out = lane_sum(acc);
  if (i < n) {
    T tail[V::size()];
    (V::loadu(a + i, n - i) - vs).exp().store(tail, n - i);
    for (int64_t l = 0; l < n - i; ++l) out += tail[l];
  }
  return out;
}

// One row of a chunk: t (m*k) -> J in place, S (m), 1/Z (m). e: scratch of m*k.
template <typename T>
void reduce_row(T* t, T* e, T* s, T* inv_z, int64_t m, int64_t k, int64_t mode, T gamma,
                bool shift) {
  if (mode == kSoftmax) {
    if (shift) {  // exp(t - max_k t): the shift cancels in p, and keeps e finite
      for (int64_t c = 0; c < m; ++c) {
        const T* tc = t + c * k;
        T top = tc[0];
        for (int64_t q = 1; q < k; ++q) top = std::max(top, tc[q]);
        for (int64_t q = 0; q < k; ++q) e[c * k + q] = tc[q] - top;
      }
      exp_into(e, e, m * k);
    } else {
      exp_into(t, e, m * k);
    }
    for (int64_t c = 0; c < m; ++c) {
      T* tc = t + c * k;
      const T* ec = e + c * k;
      T z = 0, et = 0;
      for (int64_t q = 0; q < k; ++q) {
        z += ec[q];
        et += ec[q] * tc[q];
      }
      const T h = et / z;
      const T h1 = h - T(1);
      for (int64_t q = 0; q < k; ++q) tc[q] = (tc[q] - h1) * ec[q];
      s[c] = h * gamma;
      inv_z[c] = T(1) / z;
    }
  } else if (mode == kMax) {
    // The first of equal maxima, and a NaN over any number, as torch.max(dim) picks.
    for (int64_t c = 0; c < m; ++c) {
      T* tc = t + c * k;
      int64_t best = 0;
      for (int64_t q = 1; q < k; ++q) {
        if (std::isnan(tc[best])) break;
        if (tc[q] > tc[best] || std::isnan(tc[q])) best = q;
      }
      s[c] = tc[best];
      for (int64_t q = 0; q < k; ++q) tc[q] = q == best ? T(1) : T(0);
    }
  } else {
    std::copy(t, t + m, s);
  }
}

template <typename T>
void visit_forward_impl(const at::Tensor& raw, const std::optional<at::Tensor>& col_scale,
                        const at::Tensor& j_out, const at::Tensor& z_out,
                        const std::optional<at::Tensor>& inv_z_out, const at::Tensor& labels,
                        int64_t start, int64_t mode, int64_t k, double gamma, bool shift,
                        double alpha, double delta, const std::optional<at::Tensor>& run_max,
                        const std::optional<at::Tensor>& run_sum) {
  using V = Vectorized<T>;
  const int64_t n = z_out.size(0), m = z_out.size(1), mk = m * k;
  const T* raw_p = raw.data_ptr<T>();
  const T* scale_p = data_or_null<T>(col_scale);
  T* j_p = j_out.data_ptr<T>();
  T* z_p = z_out.data_ptr<T>();
  T* iz_p = data_or_null<T>(inv_z_out);
  const int64_t* lab_p = labels.data_ptr<int64_t>();
  T* rmax_p = data_or_null<T>(run_max);
  T* rsum_p = data_or_null<T>(run_sum);
  const T a = static_cast<T>(alpha), ad = static_cast<T>(alpha * delta);
  const T g = static_cast<T>(gamma);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> e(mode == kSoftmax ? mk : 0), s(mode == kIdentity ? 0 : m), iz(iz_p ? 0 : m);
    const V va(a), vad(ad);
    for (int64_t i = lo; i < hi; ++i) {
      const T* r = raw_p + i * mk;
      T* z = z_p + i * m;
      if (mode == kIdentity) {
        // S is the scaled output itself and J is not needed: the logits alpha (S + delta) in
        // one pass, without writing S anywhere.
        for (int64_t c = 0; c < m; c += V::size()) {
          const int64_t l = std::min<int64_t>(V::size(), m - c);
          V sv = V::loadu(r + c, l);
          if (scale_p) sv = sv * V::loadu(scale_p + c, l);
          (sv * va + vad).store(z + c, l);
        }
      } else {
        T* t = j_p + i * mk;
        if (scale_p) {
          int64_t p = 0;
          for (; p + V::size() <= mk; p += V::size())
            (V::loadu(r + p) * V::loadu(scale_p + p)).store(t + p);
          for (; p < mk; ++p) t[p] = r[p] * scale_p[p];
        } else if (t != r) {
          std::copy(r, r + mk, t);
        }
        T* izr = iz_p ? iz_p + i * m : iz.data();
        reduce_row(t, e.data(), s.data(), izr, m, k, mode, g, shift);
        for (int64_t c = 0; c < m; ++c) z[c] = a * s[c] + ad;  // alpha (S + delta)
      }
      const int64_t pos = lab_p[i] - start;
      if (pos >= 0 && pos < m) z[pos] = neg_inf;
      if (rmax_p) {
        // The running max starts at the dtype's lowest finite number, never -inf, so that
        // exp(-inf - max) is 0 for a row without a logit yet.
        const T top = max_of(z, m, rmax_p[i]);
        rsum_p[i] = rsum_p[i] * std::exp(rmax_p[i] - top) + sum_exp_shifted(z, m, top);
        rmax_p[i] = top;
      }
    }
  });
}

template <typename T>
void column_lse_impl(const at::Tensor& z, const at::Tensor& out) {
  using V = Vectorized<T>;
  const int64_t n = z.size(0), m = z.size(1);
  const T* z_p = z.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  // Columns in blocks, so that the rows are read in contiguous runs and the sums vectorise.
  constexpr int64_t kBlock = 256;
  at::parallel_for(0, (m + kBlock - 1) / kBlock, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<T> top(kBlock), sum(kBlock), tmp(kBlock);
    for (int64_t b = blo; b < bhi; ++b) {
      const int64_t c0 = b * kBlock, w = std::min(kBlock, m - c0);
      std::fill(top.begin(), top.begin() + w, T(0));  // the zero logit takes part in the max
      for (int64_t i = 0; i < n; ++i) {
        const T* z = z_p + i * m + c0;
        for (int64_t c = 0; c < w; ++c) top[c] = std::max(top[c], z[c]);
      }
      for (int64_t c = 0; c < w; ++c) tmp[c] = -top[c];
      exp_into(tmp.data(), sum.data(), w);
      for (int64_t i = 0; i < n; ++i) {
        const T* z = z_p + i * m + c0;
        int64_t c = 0;
        for (; c + V::size() <= w; c += V::size())
          (V::loadu(sum.data() + c) + (V::loadu(z + c) - V::loadu(top.data() + c)).exp())
              .store(sum.data() + c);
        for (; c < w; ++c) sum[c] += std::exp(z[c] - top[c]);
      }
      for (int64_t c = 0; c < w; ++c) out_p[c0 + c] = std::log(sum[c]) + top[c];
    }
  });
}

template <typename T>
void chunk_gradient_impl(const at::Tensor& z, const std::optional<at::Tensor>& j,
                         const std::optional<at::Tensor>& inv_z,
                         const std::optional<at::Tensor>& col_scale,
                         const std::optional<at::Tensor>& raw, const at::Tensor& labels,
                         int64_t start, const at::Tensor& g_pos,
                         const std::optional<at::Tensor>& row_shift,
                         const std::optional<at::Tensor>& row_weight,
                         const std::optional<at::Tensor>& col_shift,
                         const std::optional<at::Tensor>& col_weight, int64_t k,
                         const at::Tensor& ds_out, const std::optional<at::Tensor>& vd_out,
                         double vd_scale) {
  using V = Vectorized<T>;
  const int64_t n = z.size(0), m = z.size(1), mk = m * k;
  const T* z_p = z.data_ptr<T>();
  const T* j_p = data_or_null<T>(j);
  const T* iz_p = data_or_null<T>(inv_z);
  const T* scale_p = data_or_null<T>(col_scale);
  const T* raw_p = data_or_null<T>(raw);
  const int64_t* lab_p = labels.data_ptr<int64_t>();
  const T* gp_p = g_pos.data_ptr<T>();
  const T* rs_p = data_or_null<T>(row_shift);
  const T* rw_p = data_or_null<T>(row_weight);
  const T* cs_p = data_or_null<T>(col_shift);
  const T* cw_p = data_or_null<T>(col_weight);
  T* ds_p = ds_out.data_ptr<T>();
  T* vd_p = data_or_null<T>(vd_out);
  // Rows split over the threads (equal shares whatever m); each range sums its own share of the
  // projection's dot, and the shares are added in the order of their rows.
  std::mutex mutex;
  std::vector<std::pair<int64_t, std::vector<T>>> shares;
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    // gr: dL/dS / Z of one row; ge: the same, repeated over each class's k proxies.
    std::vector<T> gr(m), ge(k > 1 ? mk : 0), vd(vd_p ? mk : 0, T(0));
    for (int64_t i = lo; i < hi; ++i) {
      const T* zr = z_p + i * m;
      const V shift_i(rs_p ? rs_p[i] : T(0)), weight_i(rw_p ? rw_p[i] : T(1));
      for (int64_t c = 0; c < m; c += V::size()) {
        const int64_t l = std::min<int64_t>(V::size(), m - c);
        V a = V::loadu(zr + c, l) - shift_i;
        if (cs_p) a = a - V::loadu(cs_p + c, l);
        a = a.exp() * weight_i;
        if (cw_p) a = a * V::loadu(cw_p + c, l);
        if (iz_p) a = a * V::loadu(iz_p + i * m + c, l);
        a.store(gr.data() + c, l);
      }
      const int64_t pos = lab_p[i] - start;
      if (pos >= 0 && pos < m) gr[pos] = gp_p[i] * (iz_p ? iz_p[i * m + pos] : T(1));
      const T* g = gr.data();
      if (k > 1) {
        for (int64_t c = 0; c < m; ++c) std::fill(ge.data() + c * k, ge.data() + (c + 1) * k, gr[c]);
        g = ge.data();
      }
      T* ds = ds_p + i * mk;
      const T* jr = j_p ? j_p + i * mk : nullptr;
      // ds and its share of the projection's dot in the same pass, while ds is in registers.
      const T* rr = vd_p ? raw_p + i * mk : nullptr;
      for (int64_t p = 0; p < mk; p += V::size()) {
        const int64_t l = std::min<int64_t>(V::size(), mk - p);
        V a = V::loadu(g + p, l);
        if (jr) a = a * V::loadu(jr + p, l);
        if (scale_p) a = a * V::loadu(scale_p + p, l);
        a.store(ds + p, l);
        if (rr) (V::loadu(vd.data() + p, l) + V::loadu(rr + p, l) * a).store(vd.data() + p, l);
      }
    }
    if (vd_p) {
      std::lock_guard<std::mutex> guard(mutex);
      shares.emplace_back(lo, std::move(vd));
    }
  });
  if (vd_p) {
    std::sort(shares.begin(), shares.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    std::fill(vd_p, vd_p + mk, T(0));
    for (const auto& share : shares)
      for (int64_t p = 0; p < mk; ++p) vd_p[p] += share.second[p];
    for (int64_t p = 0; p < mk; ++p) vd_p[p] *= static_cast<T>(vd_scale);
  }
}

// The per-class products of the proxies' side, one class's K rows (K x d, in L1) at a time. With
// K known at compile time the K accumulators stay in registers and the K chains of dependent
// multiply-adds interleave; kMaxUnrolledK bounds the instantiations, and larger K takes the loop
// with K at run time.
constexpr int64_t kMaxUnrolledK = 16;

// a (K x K) = V V^T, both halves.
template <typename T, int KP>
void gram_class(const T* vc, T* a, int64_t d, int64_t kp_runtime = KP) {
  using V = Vectorized<T>;
  const int64_t kp = KP > 0 ? KP : kp_runtime;
  for (int64_t t = 0; t < kp; ++t) {
    if constexpr (KP > 0) {
      // All K products of row t, though only u >= t are kept: with a fixed trip count the
      // accumulators stay in registers, which the half triangle's would not.
      V acc[KP];
      for (int64_t u = 0; u < KP; ++u) acc[u] = V(T(0));
      int64_t j = 0;
      for (; j + V::size() <= d; j += V::size()) {
        const V vt = V::loadu(vc + t * d + j);
        for (int64_t u = 0; u < KP; ++u) acc[u] = at::vec::fmadd(vt, V::loadu(vc + u * d + j), acc[u]);
      }
      for (int64_t u = t; u < KP; ++u) {
        T dot = lane_sum(acc[u]);
        for (int64_t q = j; q < d; ++q) dot += vc[t * d + q] * vc[u * d + q];
        a[t * KP + u] = a[u * KP + t] = dot;
      }
    } else {
      for (int64_t u = t; u < kp; ++u) {
        V acc(T(0));
        int64_t j = 0;
        for (; j + V::size() <= d; j += V::size())
          acc = at::vec::fmadd(V::loadu(vc + t * d + j), V::loadu(vc + u * d + j), acc);
        T dot = lane_sum(acc);
        for (; j < d; ++j) dot += vc[t * d + j] * vc[u * d + j];
        a[t * kp + u] = a[u * kp + t] = dot;
      }
    }
  }
}

// out (K x d) = mat (K x K) V (K x d).
template <typename T, int KP>
void times_class(const T* mat, const T* vc, T* out, int64_t d, int64_t kp_runtime = KP) {
  using V = Vectorized<T>;
  const int64_t kp = KP > 0 ? KP : kp_runtime;
  for (int64_t j = 0; j < d; j += V::size()) {
    const int64_t l = std::min<int64_t>(V::size(), d - j);
    if constexpr (KP > 0) {
      V acc[KP];
      for (int64_t t = 0; t < KP; ++t) acc[t] = V(T(0));
      for (int64_t u = 0; u < KP; ++u) {
        const V vu = V::loadu(vc + u * d + j, l);
        for (int64_t t = 0; t < KP; ++t) acc[t] = at::vec::fmadd(V(mat[t * KP + u]), vu, acc[t]);
      }
      for (int64_t t = 0; t < KP; ++t) acc[t].store(out + t * d + j, l);
    } else {
      for (int64_t t = 0; t < kp; ++t) {
        V acc(T(0));
        for (int64_t u = 0; u < kp; ++u)
          acc = at::vec::fmadd(V(mat[t * kp + u]), V::loadu(vc + u * d + j, l), acc);
        acc.store(out + t * d + j, l);
      }
    }
  }
}

// f(std::integral_constant<int, K>) for 1 <= K <= kMaxUnrolledK, else f(integral_constant<int, 0>).
template <int KP = 1, typename F>
void with_k(int64_t kp, F&& f) {
  if constexpr (KP > kMaxUnrolledK) {
    f(std::integral_constant<int, 0>{});
  } else {
    if (kp == KP) return f(std::integral_constant<int, KP>{});
    with_k<KP + 1>(kp, std::forward<F>(f));
  }
}

// The classes' K x K Gram matrices A = V V^T of the rows v (m*K x d), and from their diagonals
// the inverse norms 1 / max(||v||, eps) and the projection's factor inv^2 (0 where clamped).
template <typename T>
void class_gram_impl(const at::Tensor& v, int64_t kp, const at::Tensor& gram,
                     const at::Tensor& inv, const at::Tensor& proj, double eps) {
  const int64_t d = v.size(1), m = v.size(0) / kp;
  const T* v_p = v.data_ptr<T>();
  T* g_p = gram.data_ptr<T>();
  T* inv_p = inv.data_ptr<T>();
  T* proj_p = proj.data_ptr<T>();
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const T* vc = v_p + c * kp * d;
      T* a = g_p + c * kp * kp;
      with_k(kp, [&](auto K) { gram_class<T, decltype(K)::value>(vc, a, d, kp); });
      for (int64_t t = 0; t < kp; ++t) {
        const T norm = std::sqrt(a[t * kp + t]);
        const T r = T(1) / std::max(norm, static_cast<T>(eps));
        inv_p[c * kp + t] = r;
        proj_p[c * kp + t] = norm > static_cast<T>(eps) ? r * r : T(0);
      }
    }
  });
}

// A chunk's finish where the rows' v . D (vd) is known before D: the regulariser's share of its
// classes (returned, times scale) and, into du, (Mr - diag(c)) V, with Mr and c as the eager
// _Proxies.finish derives them; without Gram matrices (no regulariser) Mr = 0.
template <typename T>
double finish_impl(const at::Tensor& v, const std::optional<at::Tensor>& gram,
                   const at::Tensor& inv, const at::Tensor& proj, const at::Tensor& vd,
                   int64_t kp, double scale, double weight, double eps, const at::Tensor& du) {
  const int64_t d = v.size(1), m = v.size(0) / kp;
  const T* v_p = v.data_ptr<T>();
  const T* g_p = data_or_null<T>(gram);
  const T* inv_p = inv.data_ptr<T>();
  const T* proj_p = proj.data_ptr<T>();
  const T* vd_p = vd.data_ptr<T>();
  T* du_p = du.data_ptr<T>();
  std::vector<T> per_class(m, T(0));
  const T sw = static_cast<T>(-scale * weight), e = static_cast<T>(eps);
  // Every class's matrix first, then the products: the Gram matrices may lie in the chunk's own
  // rows of the gradient (the row-wise sweep keeps them there), which the products overwrite.
  std::vector<T> mats(m * kp * kp, T(0));
  at::parallel_for(0, m, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const T* ic = inv_p + c * kp;
      T* mat = mats.data() + c * kp * kp;
      for (int64_t t = 0; t < kp; ++t) {
        T dot = vd_p[c * kp + t];
        if (g_p) {
          const T* a = g_p + c * kp * kp + t * kp;
          for (int64_t u = 0; u < kp; ++u) {
            if (u == t) continue;
            const T outer = ic[t] * ic[u];
            const T sim = a[u] * outer;
            // 2 (1 - m) + eps in that order (2 + eps rounds to 2 in fp32); a NaN stays one.
            const T dist = std::sqrt((T(1) - std::min(sim, T(1))) * T(2) + e);
            if (u > t) per_class[c] += dist;
            const T mr = sim <= T(1) ? (T(1) / dist) * sw * outer : T(0);
            mat[t * kp + u] = mr;
            dot += mr * a[u];
          }
        }
        mat[t * kp + t] = -dot * proj_p[c * kp + t];
      }
    }
  });
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const T* vc = v_p + c * kp * d;
      T* oc = du_p + c * kp * d;
      const T* mat = mats.data() + c * kp * kp;
      with_k(kp, [&](auto K) { times_class<T, decltype(K)::value>(mat, vc, oc, d, kp); });
    }
  });
  double value = 0;
  for (int64_t c = 0; c < m; ++c) value += per_class[c];
  return value * scale;
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of z");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

void check_opt(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (t.has_value()) check(*t, like, name);
}

void check_labels(const at::Tensor& labels, int64_t n) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == n,
              "labels must be a contiguous int64 vector of the block's rows");
}

}  // namespace

void visit_forward(const at::Tensor& raw, const std::optional<at::Tensor>& col_scale,
                   const at::Tensor& j_out, const at::Tensor& z_out,
                   const std::optional<at::Tensor>& inv_z_out, const at::Tensor& labels,
                   int64_t start, int64_t mode, int64_t k, double gamma, bool shift, double alpha,
                   double delta, const std::optional<at::Tensor>& run_max,
                   const std::optional<at::Tensor>& run_sum) {
  check(z_out, z_out, "z");
  check(raw, z_out, "raw");
  check(j_out, z_out, "J");
  check_opt(col_scale, z_out, "col_scale");
  check_opt(inv_z_out, z_out, "inv_z");
  check_opt(run_max, z_out, "run_max");
  check_opt(run_sum, z_out, "run_sum");
  const int64_t n = z_out.size(0), m = z_out.size(1);
  TORCH_CHECK(raw.numel() == n * m * k && j_out.numel() == n * m * k, "raw and J must be n x m*k");
  TORCH_CHECK(mode != kSoftmax || inv_z_out.has_value(), "the softmax needs inv_z");
  TORCH_CHECK(run_max.has_value() == run_sum.has_value(), "run_max and run_sum go together");
  check_labels(labels, n);
  AT_DISPATCH_FLOATING_TYPES(z_out.scalar_type(), "visit_forward", [&] {
    visit_forward_impl<scalar_t>(raw, col_scale, j_out, z_out, inv_z_out, labels, start, mode, k,
                                 gamma, shift, alpha, delta, run_max, run_sum);
  });
}

void column_lse(const at::Tensor& z, const at::Tensor& out) {
  check(z, z, "z");
  check(out, z, "out");
  TORCH_CHECK(out.numel() == z.size(1), "out must have one entry per column");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "column_lse", [&] {
    column_lse_impl<scalar_t>(z, out);
  });
}

void chunk_gradient(const at::Tensor& z, const std::optional<at::Tensor>& j,
                    const std::optional<at::Tensor>& inv_z,
                    const std::optional<at::Tensor>& col_scale,
                    const std::optional<at::Tensor>& raw, const at::Tensor& labels, int64_t start,
                    const at::Tensor& g_pos, const std::optional<at::Tensor>& row_shift,
                    const std::optional<at::Tensor>& row_weight,
                    const std::optional<at::Tensor>& col_shift,
                    const std::optional<at::Tensor>& col_weight, int64_t k,
                    const at::Tensor& ds_out, const std::optional<at::Tensor>& vd_out,
                    double vd_scale) {
  check(z, z, "z");
  for (const auto& [t, name] : {std::pair{&j, "J"}, {&inv_z, "inv_z"}, {&col_scale, "col_scale"},
                                {&raw, "raw"}, {&row_shift, "row_shift"},
                                {&row_weight, "row_weight"}, {&col_shift, "col_shift"},
                                {&col_weight, "col_weight"}, {&vd_out, "vd"}})
    check_opt(*t, z, name);
  check(g_pos, z, "g_pos");
  check(ds_out, z, "ds");
  const int64_t n = z.size(0), m = z.size(1);
  TORCH_CHECK(ds_out.numel() == n * m * k, "ds must be n x m*k");
  TORCH_CHECK(!vd_out.has_value() || raw.has_value(), "the projection's dot needs raw");
  check_labels(labels, n);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "chunk_gradient", [&] {
    chunk_gradient_impl<scalar_t>(z, j, inv_z, col_scale, raw, labels, start, g_pos, row_shift,
                                  row_weight, col_shift, col_weight, k, ds_out, vd_out, vd_scale);
  });
}

void class_gram(const at::Tensor& v, int64_t kp, const at::Tensor& gram, const at::Tensor& inv,
                const at::Tensor& proj, double eps) {
  check(v, v, "v");
  check(gram, v, "gram");
  check(inv, v, "inv");
  check(proj, v, "proj");
  const int64_t rows = v.size(0);
  TORCH_CHECK(v.dim() == 2 && rows % kp == 0, "v must be (m*K, d)");
  TORCH_CHECK(gram.numel() == rows * kp && inv.numel() == rows && proj.numel() == rows,
              "gram must be (m, K, K), inv and proj (m*K,)");
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "class_gram", [&] {
    class_gram_impl<scalar_t>(v, kp, gram, inv, proj, eps);
  });
}

double finish(const at::Tensor& v, const std::optional<at::Tensor>& gram, const at::Tensor& inv,
              const at::Tensor& proj, const at::Tensor& vd, int64_t kp, double scale,
              double weight, double eps, const at::Tensor& du) {
  check(v, v, "v");
  check_opt(gram, v, "gram");
  check(inv, v, "inv");
  check(proj, v, "proj");
  check(vd, v, "vd");
  check(du, v, "du");
  const int64_t rows = v.size(0);
  TORCH_CHECK(v.dim() == 2 && rows % kp == 0 && du.numel() == v.numel(), "v and du must be (m*K, d)");
  TORCH_CHECK(inv.numel() == rows && proj.numel() == rows && vd.numel() == rows,
              "inv, proj and vd must be (m*K,)");
  TORCH_CHECK(!gram.has_value() || gram->numel() == rows * kp, "gram must be (m, K, K)");
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "finish", [&] {
    value = finish_impl<scalar_t>(v, gram, inv, proj, vd, kp, scale, weight, eps, du);
  });
  return value;
}

// --- Buffers kept for the next call --------------------------------------------------------------
//
// The proxies' gradient is a fresh buffer of the proxies' size every call (232 MB at C = 11,318,
// K = 10, d = 512), and fresh memory is mapped on its first write, page by page: each 4 KiB page
// is a fault into the kernel, which zeroes it. On the machines this backend was measured on that
// is ~2.5 us a page, a sixth of a forward + backward at that shape. A buffer from here is an
// ordinary tensor whose memory, when its last user frees it (the optimiser's zero_grad, say), is
// kept instead of going back to the system, and the next call's buffer is that memory, mapped
// already: a kept block of at least the size asked for and at most twice it (proxies sampled
// afresh every step vary in number). At most kKeep blocks are kept, the largest ones; so what is
// kept is bounded by twice the largest gradient returned. release_buffers() frees them all.
//
// In the anonymous namespace: the static in instance() must be this library's own. Where two
// builds are loaded in one process (a benchmark against another revision), a static of an
// inline function with external linkage is one object for both (GCC makes it a unique global).
namespace {

class BufferPool {
 public:
  static BufferPool& instance() {
    // Never destroyed: a tensor may outlive the static destructors and give its memory back then.
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    int64_t numel = 1;
    for (int64_t size : sizes) numel *= size;
    const size_t bytes = std::max<size_t>(1, numel * c10::elementSize(dtype));
    void* data = nullptr;
    size_t block = bytes;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto best = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it)
        if (it->first >= bytes && it->first / 2 <= bytes &&
            (best == kept_.end() || it->first < best->first))
          best = it;
      if (best != kept_.end()) {
        block = best->first;
        data = best->second;
        kept_bytes_ -= block;
        kept_.erase(best);
      }
    }
    if (data == nullptr) data = c10::alloc_cpu(block);
    report(data, static_cast<int64_t>(bytes));
    return at::from_blob(data, sizes,
                         [this, block, bytes](void* p) { give_back(p, block, bytes); },
                         at::TensorOptions().dtype(dtype).device(at::kCPU));
  }

  // Frees every kept block; returns their bytes.
  int64_t release() {
    std::lock_guard<std::mutex> guard(mutex_);
    const int64_t bytes = kept_bytes_;
    for (const auto& [size, p] : kept_) c10::free_cpu(p);
    kept_.clear();
    kept_bytes_ = 0;
    return bytes;
  }

  int64_t kept_bytes() {
    std::lock_guard<std::mutex> guard(mutex_);
    return kept_bytes_;
  }

 private:
  static constexpr size_t kKeep = 2;

  // A tensor's bytes, as torch's CPU allocator reports its own to the profiler, so that memory
  // measured through it (profile_memory=True) counts a tensor from here as one of its own, and
  // not the blocks kept here (nor a block's slack beyond its tensor), as CUDA's caching allocator
  // does not count what it has reserved.
  void report(void* p, int64_t bytes) {
    int64_t in_use, reserved;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      in_use_bytes_ += bytes;
      in_use = in_use_bytes_;
      reserved = in_use_bytes_ + kept_bytes_;
    }
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(p, bytes, in_use, reserved, c10::Device(c10::kCPU));
  }

  void give_back(void* p, size_t block, size_t bytes) {
    report(p, -static_cast<int64_t>(bytes));
    std::lock_guard<std::mutex> guard(mutex_);
    kept_.emplace_back(block, p);
    kept_bytes_ += block;
    if (kept_.size() > kKeep) {
      auto smallest = std::min_element(kept_.begin(), kept_.end());
      kept_bytes_ -= smallest->first;
      c10::free_cpu(smallest->second);
      kept_.erase(smallest);
    }
  }

  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> kept_;  // (bytes, block)
  int64_t kept_bytes_ = 0;
  int64_t in_use_bytes_ = 0;
};

}  // namespace

// An uninitialised CPU tensor of these sizes, with the dtype of like, from the kept buffers.
at::Tensor reused_empty(std::vector<int64_t> sizes, const at::Tensor& like) {
  return BufferPool::instance().empty(sizes, like.scalar_type());
}

int64_t release_buffers() { return BufferPool::instance().release(); }

int64_t kept_buffer_bytes() { return BufferPool::instance().kept_bytes(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("reused_empty", &reused_empty);
  module.def("release_buffers", &release_buffers);
  module.def("kept_buffer_bytes", &kept_buffer_bytes);
  module.def("class_gram", &class_gram);
  module.def("finish", &finish);
  module.def("visit_forward", &visit_forward);
  module.def("column_lse", &column_lse);
  module.def("chunk_gradient", &chunk_gradient);
}
