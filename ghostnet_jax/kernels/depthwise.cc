// Depthwise 2D convolution for XLA:CPU, float32, NHWC, exposed as XLA FFI
// handlers: forward, input gradient, weight gradient, and both gradients in
// one pass (what the VJP uses).
//
// Shapes (channel multiplier 1, Flax's HWIO depthwise layout):
//   x  : (G..., N, H, W, C)      input
//   w  : (G..., kh, kw, 1, C)    kernel
//   y  : (G..., N, Ho, Wo, C)    output, Ho = (H + pad_top + pad_bottom - kh) / sh + 1
// Strides and explicit padding are attributes. The leading G... dimensions
// (none, or those added by vmap with vmap_method='expand_dims') index
// independent problems. Outputs have all of them; an input may have size-1
// leading dimensions instead, and then broadcasts over them.
//
// Every loop runs over channels innermost: C is contiguous, so a pixel is a
// run of C floats and the work is a sequence of short vector FMAs. Channels are
// processed in blocks of up to kBlock vectors of kLanes floats held in
// registers; a channel count that is not a multiple of kLanes ends with one
// vector that overlaps the previous block and writes back only its new lanes
// (below kLanes channels the kernels run with scalar "vectors").
//
// Parallelism: rows of the output (forward), of the input (input gradient) or
// fixed chunks of output rows (weight gradient, both gradients) are spread
// over XLA's intra-op thread pool; the calling thread takes part. Results are
// deterministic: every element of y and dx is computed by one task in a fixed
// order, and dw sums per-chunk partial results in chunk order, with chunks
// that depend only on the shapes (not on the number of threads).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace ghostnet_jax {
namespace {

// ---------------------------------------------------------------------------
// SIMD: GCC/Clang vector extensions, so the same code builds for any target.
// ---------------------------------------------------------------------------

#if defined(GHOSTNET_LANES)  // -DGHOSTNET_LANES=16 etc., for experiments
constexpr int kLanes = GHOSTNET_LANES;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr int kBlock = 4;  // vectors per channel block in the main loops

template <int L>
struct Simd {
  typedef float T __attribute__((vector_size(L * sizeof(float))));
  static inline T Load(const float* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
  }
  static inline void Store(float* p, T v) { std::memcpy(p, &v, sizeof(T)); }
  // Writes lanes [skip, L) of v to p[skip..L).
  static inline void StoreTail(float* p, T v, int skip) {
    float tmp[L];
    std::memcpy(tmp, &v, sizeof(T));
    for (int l = skip; l < L; ++l) p[l] = tmp[l];
  }
  // Adds lanes [skip, L) of v to p[skip..L).
  static inline void AddTail(float* p, T v, int skip) {
    float tmp[L];
    std::memcpy(tmp, &v, sizeof(T));
    for (int l = skip; l < L; ++l) p[l] += tmp[l];
  }
};

template <>
struct Simd<1> {
  using T = float;
  static inline T Load(const float* p) { return *p; }
  static inline void Store(float* p, T v) { *p = v; }
  static inline void StoreTail(float* p, T v, int skip) {
    if (skip == 0) *p = v;
  }
  static inline void AddTail(float* p, T v, int skip) {
    if (skip == 0) *p += v;
  }
};

// Calls body(std::integral_constant<int, NV>, c, skip) over channel blocks of
// NV vectors of L lanes starting at channel c: blocks of kBlock vectors, then
// one block of the remaining whole vectors, then, when L does not divide C, one
// vector that ends at channel C and overlaps the previous block; its first
// `skip` lanes are already done. Needs C >= L.
template <int L, typename Body>
inline void ForChannelBlocks(int64_t channels, Body&& body) {
  static_assert(kBlock == 4, "the remainder switch below assumes kBlock == 4");
  const int64_t vectors = channels / L;
  int64_t c = 0;
  for (int64_t v = 0; v + kBlock <= vectors; v += kBlock, c += kBlock * L) {
    body(std::integral_constant<int, kBlock>{}, c, 0);
  }
  switch (vectors % kBlock) {
    case 1:
      body(std::integral_constant<int, 1>{}, c, 0);
      break;
    case 2:
      body(std::integral_constant<int, 2>{}, c, 0);
      break;
    case 3:
      body(std::integral_constant<int, 3>{}, c, 0);
      break;
    default:
      break;
  }
  c = vectors * L;
  if (c < channels) {
    body(std::integral_constant<int, 1>{}, channels - L,
         static_cast<int>(L - (channels - c)));
  }
}

// ---------------------------------------------------------------------------
// Parallel loops on XLA's intra-op thread pool.
// ---------------------------------------------------------------------------

// Runs tasks on a thread pool, or serially without one.
struct Runner {
  ffi::ThreadPool* pool = nullptr;

  int64_t threads() const {
    return pool == nullptr ? 1 : std::max<int64_t>(1, pool->num_threads());
  }

  // Runs fn(t) for t in [0, num_tasks) and returns when all have finished.
  // Helpers scheduled on the pool and the calling thread claim tasks from a
  // shared counter. A helper that starts late finds nothing left and exits, so
  // the caller never waits for a task that has not started (no deadlock when
  // the pool is busy or when the caller is itself a pool thread).
  void For(int64_t num_tasks, const std::function<void(int64_t)>& fn) const {
    const int64_t helpers = std::min(threads(), num_tasks) - 1;
    if (helpers <= 0) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
      int64_t total = 0;
      const std::function<void(int64_t)>* fn = nullptr;
      std::mutex mu;
      std::condition_variable cv;
    };
    auto state = std::make_shared<State>();
    state->total = num_tasks;
    state->fn = &fn;
    auto work = [](State& s) {
      int64_t finished = 0;
      for (;;) {
        const int64_t t = s.next.fetch_add(1, std::memory_order_relaxed);
        if (t >= s.total) break;
        (*s.fn)(t);
        ++finished;
      }
      if (finished > 0 &&
          s.done.fetch_add(finished, std::memory_order_acq_rel) + finished ==
              s.total) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    };
    for (int64_t h = 0; h < helpers; ++h) {
      pool->Schedule([state, work]() { work(*state); });
    }
    work(*state);
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] {
      return state->done.load(std::memory_order_acquire) == state->total;
    });
  }

  // Runs fn(begin, end) over [0, items) cut into about 8 ranges per thread
  // (for work whose result does not depend on the cut).
  void ForRanges(int64_t items,
                 const std::function<void(int64_t, int64_t)>& fn) const {
    const int64_t tasks = std::max<int64_t>(1, std::min(items, 8 * threads()));
    const int64_t per_task = (items + tasks - 1) / tasks;
    For((items + per_task - 1) / per_task, [&](int64_t t) {
      fn(t * per_task, std::min(items, (t + 1) * per_task));
    });
  }
};

// ---------------------------------------------------------------------------
// Geometry, read from the buffers and checked against the attributes.
// ---------------------------------------------------------------------------

struct Geometry {
  int64_t groups;  // product of the leading (vmap) dimensions
  // Whether x, the kernel and y have the leading dimensions (else all 1).
  bool x_batched, w_batched, y_batched;
  int64_t n, h, w, c, ho, wo, kh, kw;
  int64_t sh, sw, pt, pl;
  int64_t x_size() const { return n * h * w * c; }
  int64_t y_size() const { return n * ho * wo * c; }
  int64_t w_size() const { return kh * kw * c; }
  // Offsets of group grp in each buffer.
  int64_t x_offset(int64_t grp) const { return x_batched ? grp * x_size() : 0; }
  int64_t w_offset(int64_t grp) const { return w_batched ? grp * w_size() : 0; }
  int64_t y_offset(int64_t grp) const { return y_batched ? grp * y_size() : 0; }
};

int64_t Product(ffi::Span<const int64_t> dims, size_t count) {
  int64_t p = 1;
  for (size_t i = 0; i < count; ++i) p *= dims[i];
  return p;
}

std::string DimsString(ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + ")";
}

// x_dims: (G..., N, H, W, C); w_dims: (G'..., kh, kw, 1, C);
// y_dims: (G..., N, Ho, Wo, C).
ffi::Error MakeGeometry(ffi::Span<const int64_t> x_dims,
                        ffi::Span<const int64_t> w_dims,
                        ffi::Span<const int64_t> y_dims, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                        Geometry* g) {
  const size_t rank = x_dims.size();
  if (rank < 4 || w_dims.size() != rank || y_dims.size() != rank) {
    return ffi::Error::InvalidArgument(
        "depthwise_conv2d: expected x (..., N, H, W, C), kernel (..., kh, kw, "
        "1, C) and y (..., N, Ho, Wo, C) of one rank >= 4; got x " +
        DimsString(x_dims) + ", kernel " + DimsString(w_dims) + ", y " +
        DimsString(y_dims));
  }
  const size_t lead = rank - 4;
  const int64_t x_groups = Product(x_dims, lead);
  const int64_t w_groups = Product(w_dims, lead);
  const int64_t y_groups = Product(y_dims, lead);
  g->groups = std::max({x_groups, w_groups, y_groups});
  g->x_batched = x_groups != 1;
  g->w_batched = w_groups != 1;
  g->y_batched = y_groups != 1;
  bool ok = true;
  for (size_t i = 0; i < lead; ++i) {
    const int64_t d = std::max({x_dims[i], w_dims[i], y_dims[i]});
    ok = ok && (!g->x_batched || x_dims[i] == d);
    ok = ok && (!g->w_batched || w_dims[i] == d);
    ok = ok && (!g->y_batched || y_dims[i] == d);
  }
  g->n = x_dims[lead];
  g->h = x_dims[lead + 1];
  g->w = x_dims[lead + 2];
  g->c = x_dims[lead + 3];
  g->kh = w_dims[lead];
  g->kw = w_dims[lead + 1];
  g->ho = y_dims[lead + 1];
  g->wo = y_dims[lead + 2];
  g->sh = sh;
  g->sw = sw;
  g->pt = pt;
  g->pl = pl;
  ok = ok && w_dims[lead + 2] == 1 && w_dims[lead + 3] == g->c;
  ok = ok && y_dims[lead] == g->n && y_dims[lead + 3] == g->c;
  ok = ok && sh >= 1 && sw >= 1 && pt >= 0 && pb >= 0 && pl >= 0 && pr >= 0;
  ok = ok && g->kh >= 1 && g->kw >= 1;
  ok = ok && g->h + pt + pb >= g->kh && g->w + pl + pr >= g->kw;
  ok = ok && g->ho == (g->h + pt + pb - g->kh) / sh + 1;
  ok = ok && g->wo == (g->w + pl + pr - g->kw) / sw + 1;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "depthwise_conv2d: inconsistent shapes x " + DimsString(x_dims) +
        ", kernel " + DimsString(w_dims) + ", y " + DimsString(y_dims) +
        " for strides (" + std::to_string(sh) + ", " + std::to_string(sw) +
        ") and padding ((" + std::to_string(pt) + ", " + std::to_string(pb) +
        "), (" + std::to_string(pl) + ", " + std::to_string(pr) + "))");
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Tap ranges along one axis (rows or columns).
//
// Along an axis with input size `in`, output size `out`, kernel size k, stride
// s and leading padding p, output o reads input o * s + t - p through tap t.
// ---------------------------------------------------------------------------

// The taps t = first_tap + m, m in [0, count), of output o that read inside
// the input (forward and weight gradient), starting at input first_in.
struct ForwardTaps {
  int64_t first_tap, first_in, count;
};

std::vector<ForwardTaps> MakeForwardTaps(int64_t in, int64_t out, int64_t k,
                                         int64_t s, int64_t p) {
  std::vector<ForwardTaps> taps(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t first = o * s - p;
    const int64_t lo = std::max<int64_t>(0, -first);
    const int64_t hi = std::min<int64_t>(k, in - first);
    taps[o] = {lo, first + lo, std::max<int64_t>(0, hi - lo)};
  }
  return taps;
}

// The (tap, output) pairs that read input index q (input gradient):
// t = first_tap + m * s and o = first_out - m for m in [0, count).
struct BackwardTaps {
  int64_t first_tap, first_out, count;
};

std::vector<BackwardTaps> MakeBackwardTaps(int64_t in, int64_t out, int64_t k,
                                           int64_t s, int64_t p) {
  std::vector<BackwardTaps> taps(in);
  for (int64_t q = 0; q < in; ++q) {
    // o * s == q + p - t: the first tap is (q + p) mod s, with the largest o.
    int64_t t = (q + p) % s;
    int64_t o = (q + p - t) / s;
    if (o >= out) {  // skip to the last output
      t += (o - out + 1) * s;
      o = out - 1;
    }
    const int64_t count = t >= k ? 0 : std::min((k - t + s - 1) / s, o + 1);
    taps[q] = {t, o, count};
  }
  return taps;
}

// ---------------------------------------------------------------------------
// The inner loop of the forward and the input gradient. For one output pixel,
// a sum over a rows x cols window of taps
//   out[c] = sum_{r, q} a[r * a_rs + q * a_cs + c] * b[r * b_rs + q * b_cs + c]
// (a: the image, b: the kernel; strides in floats, possibly negative). Pixels
// of a row whose windows have the same taps form a run: pixel m of a run reads
// a + m * a_ps and writes out + m * out_ps. A run is computed kGroup pixels at
// a time, so each kernel vector loaded serves several pixels and the loop
// overhead is shared. Every pixel sums its taps in the same order however it
// is grouped, so the grouping does not change results.
// ---------------------------------------------------------------------------

struct Window {
  const float* a;
  int64_t a_rs, a_cs;
  const float* b;
  int64_t b_rs, b_cs;
  int64_t rows, cols;
};

// A run of `length` pixels start, start + step, ... with the same taps.
struct Run {
  int64_t start, step, length;
};

#if defined(__AVX512F__)
constexpr int kRegisters = 32;  // vector registers
#else
constexpr int kRegisters = 16;
#endif
constexpr int kGroup = 4;  // pixels computed together

// Whether P pixels of NV vectors (accumulators plus the kernel vectors) fit in
// the vector registers, with a few to spare.
constexpr bool FitsInRegisters(int nv, int p) {
  return (p + 1) * nv + 4 <= kRegisters;
}

// P pixels of NV vectors from channel c. NC: win.cols when known at compile
// time, else 0.
template <int L, int NV, int NC, int P>
inline void WindowBlock(const Window& win, int64_t a_ps, int64_t c, int skip,
                        float* out, int64_t out_ps) {
  using S = Simd<L>;
  using V = typename S::T;
  const int64_t cols = NC > 0 ? NC : win.cols;
  V acc[P][NV] = {};
  for (int64_t r = 0; r < win.rows; ++r) {
    const float* ar = win.a + r * win.a_rs + c;
    const float* br = win.b + r * win.b_rs + c;
    for (int64_t q = 0; q < cols; ++q) {
      const float* ap = ar + q * win.a_cs;
      const float* bp = br + q * win.b_cs;
      V wv[NV];
      for (int k = 0; k < NV; ++k) wv[k] = S::Load(bp + k * L);
      for (int p = 0; p < P; ++p) {
        for (int k = 0; k < NV; ++k) {
          acc[p][k] += S::Load(ap + p * a_ps + k * L) * wv[k];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    float* o = out + p * out_ps + c;
    if (skip == 0) {
      for (int k = 0; k < NV; ++k) S::Store(o + k * L, acc[p][k]);
    } else {
      S::StoreTail(o, acc[p][0], skip);
    }
  }
}

template <int L, int NC>
inline void WindowRun(const Window& win, int64_t a_ps, int64_t length,
                      int64_t channels, float* out, int64_t out_ps) {
  int64_t m = 0;
  for (; m + kGroup <= length; m += kGroup) {
    Window w = win;
    w.a += m * a_ps;
    float* o = out + m * out_ps;
    ForChannelBlocks<L>(channels, [&](auto nv, int64_t c, int skip) {
      constexpr int NV = decltype(nv)::value;
      static_assert(kGroup == 4, "kGroup == 4 assumed below");
      if constexpr (FitsInRegisters(NV, 4)) {
        WindowBlock<L, NV, NC, 4>(w, a_ps, c, skip, o, out_ps);
      } else if constexpr (FitsInRegisters(NV, 2)) {
        WindowBlock<L, NV, NC, 2>(w, a_ps, c, skip, o, out_ps);
        Window w2 = w;
        w2.a += 2 * a_ps;
        WindowBlock<L, NV, NC, 2>(w2, a_ps, c, skip, o + 2 * out_ps, out_ps);
      } else {
        for (int p = 0; p < 4; ++p) {
          Window w1 = w;
          w1.a += p * a_ps;
          WindowBlock<L, NV, NC, 1>(w1, a_ps, c, skip, o + p * out_ps, out_ps);
        }
      }
    });
  }
  for (; m < length; ++m) {
    Window w = win;
    w.a += m * a_ps;
    float* o = out + m * out_ps;
    ForChannelBlocks<L>(channels, [&](auto nv, int64_t c, int skip) {
      WindowBlock<L, decltype(nv)::value, NC, 1>(w, a_ps, c, skip, o, out_ps);
    });
  }
}

// WindowRun with the column count known at compile time for common kernels.
template <int L>
inline void WindowRunAnyCols(const Window& win, int64_t a_ps, int64_t length,
                             int64_t channels, float* out, int64_t out_ps) {
  switch (win.cols) {
    case 1:
      return WindowRun<L, 1>(win, a_ps, length, channels, out, out_ps);
    case 2:
      return WindowRun<L, 2>(win, a_ps, length, channels, out, out_ps);
    case 3:
      return WindowRun<L, 3>(win, a_ps, length, channels, out, out_ps);
    case 5:
      return WindowRun<L, 5>(win, a_ps, length, channels, out, out_ps);
    default:
      return WindowRun<L, 0>(win, a_ps, length, channels, out, out_ps);
  }
}

// ---------------------------------------------------------------------------
// Forward: y[n, oh, ow, c] = sum_{i, j} x[n, oh*sh+i-pt, ow*sw+j-pl, c] w[i, j, c]
// ---------------------------------------------------------------------------

// Runs of consecutive output columns with the same taps (all of them inside
// the image, in the middle of the row).
std::vector<Run> MakeForwardRuns(const std::vector<ForwardTaps>& taps) {
  std::vector<Run> runs;
  for (int64_t o = 0; o < static_cast<int64_t>(taps.size()); ++o) {
    if (!runs.empty()) {
      const ForwardTaps& first = taps[runs.back().start];
      if (taps[o].first_tap == first.first_tap &&
          taps[o].count == first.count) {
        ++runs.back().length;
        continue;
      }
    }
    runs.push_back({o, 1, 1});
  }
  return runs;
}

template <int L>
void Forward(const Runner& run, const Geometry& g, const float* x,
             const float* w, float* y) {
  const std::vector<ForwardTaps> row_taps =
      MakeForwardTaps(g.h, g.ho, g.kh, g.sh, g.pt);
  const std::vector<ForwardTaps> col_taps =
      MakeForwardTaps(g.w, g.wo, g.kw, g.sw, g.pl);
  const std::vector<Run> col_runs = MakeForwardRuns(col_taps);
  const int64_t C = g.c;
  // Output rows of all groups and images: r = (grp * N + n) * Ho + oh.
  run.ForRanges(g.groups * g.n * g.ho, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t oh = r % g.ho, n = (r / g.ho) % g.n, grp = r / g.ho / g.n;
      const float* x_img = x + g.x_offset(grp) + n * g.h * g.w * C;
      const float* w_grp = w + g.w_offset(grp);
      float* y_row = y + g.y_offset(grp) + (n * g.ho + oh) * g.wo * C;
      const ForwardTaps& rt = row_taps[oh];
      for (const Run& cr : col_runs) {
        const ForwardTaps& ct = col_taps[cr.start];
        const Window win = {
            x_img + (rt.first_in * g.w + ct.first_in) * C, g.w * C, C,
            w_grp + (rt.first_tap * g.kw + ct.first_tap) * C, g.kw * C, C,
            rt.count, ct.count};
        WindowRunAnyCols<L>(win, g.sw * C, cr.length, C,
                            y_row + cr.start * C, C);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Input gradient:
//   dx[n, ih, iw, c] = sum dy[n, oh, ow, c] w[i, j, c]
// over the (i, oh) with oh*sh + i - pt == ih and the (j, ow) with
// ow*sw + j - pl == iw: a window of taps i = i0 + m*sh (oh = oh0 - m) by
// j = j0 + m*sw (ow = ow0 - m). Gathered per input pixel, so each dx element
// is written once. Input columns iw and iw + sw have the same taps (one output
// column apart), so runs step by sw.
// ---------------------------------------------------------------------------

// Runs of input columns q, q + s, q + 2s, ... with the same taps and
// consecutive outputs.
std::vector<Run> MakeBackwardRuns(const std::vector<BackwardTaps>& taps,
                                  int64_t s) {
  std::vector<Run> runs;
  const int64_t size = static_cast<int64_t>(taps.size());
  for (int64_t residue = 0; residue < std::min(s, size); ++residue) {
    const size_t first_run = runs.size();
    for (int64_t q = residue; q < size; q += s) {
      if (runs.size() > first_run) {
        Run& run = runs.back();
        const BackwardTaps& first = taps[run.start];
        if (taps[q].first_tap == first.first_tap &&
            taps[q].count == first.count &&
            taps[q].first_out == first.first_out + run.length) {
          ++run.length;
          continue;
        }
      }
      runs.push_back({q, s, 1});
    }
  }
  return runs;
}

// Tap windows of the input gradient, for every input row and column.
struct InputGradTaps {
  std::vector<BackwardTaps> rows, cols;
  std::vector<Run> col_runs;
  explicit InputGradTaps(const Geometry& g)
      : rows(MakeBackwardTaps(g.h, g.ho, g.kh, g.sh, g.pt)),
        cols(MakeBackwardTaps(g.w, g.wo, g.kw, g.sw, g.pl)),
        col_runs(MakeBackwardRuns(cols, g.sw)) {}
};

// One input row ih of one image: dy_img (Ho, Wo, C), w (kh, kw, C),
// dx_row (W, C).
template <int L>
inline void InputGradRow(const Geometry& g, const InputGradTaps& taps,
                         const float* dy_img, const float* w, int64_t ih,
                         float* dx_row) {
  const int64_t C = g.c;
  const BackwardTaps& rt = taps.rows[ih];
  for (const Run& cr : taps.col_runs) {
    const BackwardTaps& ct = taps.cols[cr.start];
    const Window win = {
        dy_img + (rt.first_out * g.wo + ct.first_out) * C, -g.wo * C, -C,
        w + (rt.first_tap * g.kw + ct.first_tap) * C, g.sh * g.kw * C,
        g.sw * C, rt.count, ct.count};
    WindowRunAnyCols<L>(win, C, cr.length, C, dx_row + cr.start * C,
                        cr.step * C);
  }
}

template <int L>
void InputGrad(const Runner& run, const Geometry& g, const float* dy,
               const float* w, float* dx) {
  const InputGradTaps taps(g);
  const int64_t C = g.c;
  // Input rows of all groups and images: r = (grp * N + n) * H + ih.
  run.ForRanges(g.groups * g.n * g.h, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ih = r % g.h, n = (r / g.h) % g.n, grp = r / g.h / g.n;
      InputGradRow<L>(g, taps, dy + g.y_offset(grp) + n * g.ho * g.wo * C,
                      w + g.w_offset(grp), ih,
                      dx + g.x_offset(grp) + (n * g.h + ih) * g.w * C);
    }
  });
}

// ---------------------------------------------------------------------------
// Weight gradient:
//   dw[i, j, c] = sum_{n, oh, ow} x[n, oh*sh+i-pt, ow*sw+j-pl, c] dy[n, oh, ow, c]
// The N * Ho output rows of a group are cut into chunks that depend only on
// the shapes; each chunk sums into its own partial (kh, kw, C) buffer and the
// partials are added in chunk order, so the result does not depend on the
// number of threads or on scheduling.
// ---------------------------------------------------------------------------

int64_t WeightGradChunks(const Geometry& g) {
  const int64_t rows = g.n * g.ho;
  // At most 64 chunks, and partial buffers at most a quarter of the input.
  const int64_t by_memory = std::max<int64_t>(1, g.x_size() / (4 * g.w_size()));
  return std::max<int64_t>(1, std::min({rows, int64_t{64}, by_memory}));
}

// The outputs o in [lo, hi) along one axis that read inside the input through
// tap t (weight gradient).
struct OutputRange {
  int64_t lo, hi;
};

std::vector<OutputRange> MakeOutputRanges(int64_t in, int64_t out, int64_t k,
                                          int64_t s, int64_t p) {
  std::vector<OutputRange> ranges(k);
  for (int64_t t = 0; t < k; ++t) {
    // 0 <= o * s + t - p <= in - 1.
    const int64_t a = p - t, b = in - 1 + p - t;
    const int64_t lo = a <= 0 ? 0 : (a + s - 1) / s;
    const int64_t hi = b < 0 ? 0 : std::min<int64_t>(out, b / s + 1);
    ranges[t] = {lo, std::max(lo, hi)};
  }
  return ranges;
}

// Tap ranges of the weight gradient.
struct WeightGradTaps {
  std::vector<ForwardTaps> rows;  // per output row
  std::vector<OutputRange> cols;  // per kernel column
  // The output columns where every kernel column reads inside the image (the
  // middle of the row; empty, lo == hi, when there is none or when the kernel
  // width has no specialised loop).
  OutputRange all_cols;

  explicit WeightGradTaps(const Geometry& g)
      : rows(MakeForwardTaps(g.h, g.ho, g.kh, g.sh, g.pt)),
        cols(MakeOutputRanges(g.w, g.wo, g.kw, g.sw, g.pl)) {
    all_cols = {0, 0};
    if (g.kw == 1 || g.kw == 3 || g.kw == 5) {
      for (const OutputRange& r : cols) {
        all_cols.lo = std::max(all_cols.lo, r.lo);
      }
      int64_t hi = g.wo;
      for (const OutputRange& r : cols) hi = std::min(hi, r.hi);
      all_cols.hi = std::max(all_cols.lo, hi);
    }
  }
};

// Adds acc (NV vectors) to p, or only lanes [skip, L) of acc[0] when skip > 0.
template <int L, int NV>
inline void AddVectors(float* p, const typename Simd<L>::T* acc, int skip) {
  using S = Simd<L>;
  if (skip == 0) {
    for (int k = 0; k < NV; ++k) S::Store(p + k * L, S::Load(p + k * L) + acc[k]);
  } else {
    S::AddTail(p, acc[0], skip);
  }
}

// For the kernel columns j < KW of one kernel row, over `count` output
// pixels m: partial[j * C + c] += sum_m x[m * x_step + j * C + c] dy[m * C + c]
// for the NV vectors of channels at c (pointers already offset by c). Loads
// each dy vector once for all KW columns.
template <int L, int NV, int KW>
inline void WeightGradColumns(const float* x, int64_t x_step, const float* dy,
                              int64_t count, int64_t C, int skip,
                              float* partial) {
  using S = Simd<L>;
  using V = typename S::T;
  V acc[KW][NV] = {};
  for (int64_t m = 0; m < count; ++m) {
    const float* xp = x + m * x_step;
    V d[NV];
    for (int k = 0; k < NV; ++k) d[k] = S::Load(dy + m * C + k * L);
    for (int j = 0; j < KW; ++j) {
      for (int k = 0; k < NV; ++k) {
        acc[j][k] += S::Load(xp + j * C + k * L) * d[k];
      }
    }
  }
  for (int j = 0; j < KW; ++j) AddVectors<L, NV>(partial + j * C, acc[j], skip);
}

// Adds output row oh's contribution to partial (kh, kw, C).
// x_img: (H, W, C); dy_row: (Wo, C).
template <int L>
inline void WeightGradRow(const Geometry& g, const WeightGradTaps& taps,
                          const float* x_img, const float* dy_row, int64_t oh,
                          float* partial) {
  const int64_t C = g.c;
  const ForwardTaps& rt = taps.rows[oh];
  const OutputRange all = taps.all_cols;
  const int64_t x_step = g.sw * C;
  for (int64_t m = 0; m < rt.count; ++m) {
    const int64_t i = rt.first_tap + m;
    const float* x_row = x_img + (rt.first_in + m) * g.w * C;
    float* p_row = partial + i * g.kw * C;
    ForChannelBlocks<L>(C, [&](auto nv, int64_t c, int skip) {
      constexpr int NV = decltype(nv)::value;
      // The middle of the row, all kernel columns at once.
      if (all.hi > all.lo) {
        const float* x0 = x_row + (all.lo * g.sw - g.pl) * C + c;
        const float* dy0 = dy_row + all.lo * C + c;
        const int64_t count = all.hi - all.lo;
        switch (g.kw) {
          case 1:
            WeightGradColumns<L, NV, 1>(x0, x_step, dy0, count, C, skip,
                                        p_row + c);
            break;
          case 3:
            WeightGradColumns<L, NV, 3>(x0, x_step, dy0, count, C, skip,
                                        p_row + c);
            break;
          case 5:
            WeightGradColumns<L, NV, 5>(x0, x_step, dy0, count, C, skip,
                                        p_row + c);
            break;
          default:
            break;  // all_cols is empty for other widths
        }
      }
      // The rest, one kernel column at a time: outputs [lo, all.lo) and
      // [all.hi, hi) (all of [lo, hi) when all_cols is empty).
      for (int64_t j = 0; j < g.kw; ++j) {
        const OutputRange& cr = taps.cols[j];
        const OutputRange parts[2] = {{cr.lo, std::min(cr.hi, all.lo)},
                                      {std::max(cr.lo, all.hi), cr.hi}};
        for (const OutputRange& part : parts) {
          if (part.hi <= part.lo) continue;
          WeightGradColumns<L, NV, 1>(
              x_row + (part.lo * g.sw + j - g.pl) * C + c, x_step,
              dy_row + part.lo * C + c, part.hi - part.lo, C, skip,
              p_row + j * C + c);
        }
      }
    });
  }
}

// Sums the partials (groups, chunks, kh, kw, C) into dw in chunk order; dw is
// (groups, kh, kw, C) when dw_batched, else (kh, kw, C) summed over groups
// (ffi_call always gives an output every leading dimension, so only with
// groups == 1).
void ReducePartials(const Geometry& g, int64_t chunks,
                    const std::vector<float>& partials, float* dw,
                    bool dw_batched) {
  const int64_t ws = g.w_size();
  std::fill(dw, dw + (dw_batched ? g.groups : 1) * ws, 0.0f);
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    float* out = dw + (dw_batched ? grp * ws : 0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* p = partials.data() + (grp * chunks + chunk) * ws;
      for (int64_t e = 0; e < ws; ++e) out[e] += p[e];
    }
  }
}

template <int L>
void WeightGrad(const Runner& run, const Geometry& g, const float* x,
                const float* dy, float* dw) {
  const WeightGradTaps taps(g);
  const int64_t C = g.c;
  const int64_t rows = g.n * g.ho;
  const int64_t chunks = WeightGradChunks(g);
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  const int64_t ws = g.w_size();
  std::vector<float> partials(g.groups * chunks * ws, 0.0f);
  run.For(g.groups * chunks, [&](int64_t task) {
    const int64_t grp = task / chunks, chunk = task % chunks;
    float* partial = partials.data() + task * ws;
    const int64_t end = std::min(rows, (chunk + 1) * per_chunk);
    for (int64_t r = chunk * per_chunk; r < end; ++r) {
      const int64_t oh = r % g.ho, n = r / g.ho;
      WeightGradRow<L>(g, taps, x + g.x_offset(grp) + n * g.h * g.w * C,
                       dy + g.y_offset(grp) + (n * g.ho + oh) * g.wo * C, oh,
                       partial);
    }
  });
  ReducePartials(g, chunks, partials, dw, g.w_batched);
}

// ---------------------------------------------------------------------------
// Both gradients in one pass over x and dy. The weight-gradient chunks of
// output rows (as in WeightGrad) also compute the input-gradient rows whose
// last contributing output row is theirs, right after it: those rows of dy are
// still in cache, so x and dy are read from memory once and dx written once.
// ---------------------------------------------------------------------------

// g describes the inputs x, dy and w; dx (and dw) has the leading dimensions
// when dx_batched (dw_batched), whether x (w) has them or not.
template <int L>
void Backward(const Runner& run, const Geometry& g, const float* x,
              const float* dy, const float* w, float* dx, bool dx_batched,
              float* dw, bool dw_batched) {
  const WeightGradTaps wg_taps(g);
  const InputGradTaps ig_taps(g);
  // Input rows [ready[oh], ready[oh + 1]) are complete after output row oh:
  // the last output row that input row ih reaches is min((ih + pt) / sh, Ho-1).
  std::vector<int64_t> ready(g.ho + 1, g.h);
  for (int64_t ih = g.h - 1; ih >= 0; --ih) {
    ready[std::min((ih + g.pt) / g.sh, g.ho - 1)] = ih;
  }
  for (int64_t oh = g.ho - 1; oh >= 0; --oh) {
    ready[oh] = std::min(ready[oh], ready[oh + 1]);
  }
  const int64_t C = g.c;
  const int64_t rows = g.n * g.ho;
  const int64_t chunks = WeightGradChunks(g);
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  const int64_t ws = g.w_size();
  std::vector<float> partials(g.groups * chunks * ws, 0.0f);
  run.For(g.groups * chunks, [&](int64_t task) {
    const int64_t grp = task / chunks, chunk = task % chunks;
    float* partial = partials.data() + task * ws;
    const float* w_grp = w + g.w_offset(grp);
    const int64_t end = std::min(rows, (chunk + 1) * per_chunk);
    for (int64_t r = chunk * per_chunk; r < end; ++r) {
      const int64_t oh = r % g.ho, n = r / g.ho;
      const float* x_img = x + g.x_offset(grp) + n * g.h * g.w * C;
      const float* dy_img = dy + g.y_offset(grp) + n * g.ho * g.wo * C;
      float* dx_img =
          dx + (dx_batched ? grp * g.x_size() : 0) + n * g.h * g.w * C;
      WeightGradRow<L>(g, wg_taps, x_img, dy_img + oh * g.wo * C, oh,
                       partial);
      for (int64_t ih = ready[oh]; ih < ready[oh + 1]; ++ih) {
        InputGradRow<L>(g, ig_taps, dy_img, w_grp, ih, dx_img + ih * g.w * C);
      }
    }
  });
  ReducePartials(g, chunks, partials, dw, dw_batched);
}

// ---------------------------------------------------------------------------
// FFI handlers.
// ---------------------------------------------------------------------------

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

// Runs kernel<kLanes> or, below kLanes channels, kernel<1> (scalar).
#define GHOSTNET_DISPATCH(g, kernel, ...) \
  do {                                    \
    if ((g).c >= kLanes) {                \
      kernel<kLanes>(__VA_ARGS__);        \
    } else {                              \
      kernel<1>(__VA_ARGS__);             \
    }                                     \
  } while (0)

ffi::Error ForwardImpl(ffi::ThreadPool pool, F32 x, F32 w, F32Result y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                       int64_t pl, int64_t pr) {
  Geometry g;
  ffi::Error err = MakeGeometry(x.dimensions(), w.dimensions(),
                                y->dimensions(), sh, sw, pt, pb, pl, pr, &g);
  if (!err.success()) return err;
  GHOSTNET_DISPATCH(g, Forward, Runner{&pool}, g, x.typed_data(),
                    w.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, F32 dy, F32 w, F32Result dx,
                         int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                         int64_t pl, int64_t pr) {
  Geometry g;  // its x is the output dx
  ffi::Error err = MakeGeometry(dx->dimensions(), w.dimensions(),
                                dy.dimensions(), sh, sw, pt, pb, pl, pr, &g);
  if (!err.success()) return err;
  GHOSTNET_DISPATCH(g, InputGrad, Runner{&pool}, g, dy.typed_data(),
                    w.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, F32 x, F32 dy, F32Result dw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                          int64_t pl, int64_t pr) {
  Geometry g;  // its kernel is the output dw
  ffi::Error err = MakeGeometry(x.dimensions(), dw->dimensions(),
                                dy.dimensions(), sh, sw, pt, pb, pl, pr, &g);
  if (!err.success()) return err;
  GHOSTNET_DISPATCH(g, WeightGrad, Runner{&pool}, g, x.typed_data(),
                    dy.typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

// Whether `out` has the trailing dimensions of `in` and leading dimensions
// that hold g.groups problems; sets *batched to whether there are several.
bool MatchesInput(ffi::Span<const int64_t> out, ffi::Span<const int64_t> in,
                  const Geometry& g, bool* batched) {
  if (out.size() != in.size()) return false;
  const size_t lead = in.size() - 4;
  for (size_t i = lead; i < in.size(); ++i) {
    if (out[i] != in[i]) return false;
  }
  const int64_t groups = Product(out, lead);
  *batched = groups != 1;
  return groups == g.groups;
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, F32 x, F32 dy, F32 w,
                        F32Result dx, F32Result dw, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  ffi::Error err = MakeGeometry(x.dimensions(), w.dimensions(),
                                dy.dimensions(), sh, sw, pt, pb, pl, pr, &g);
  if (!err.success()) return err;
  bool dx_batched = false, dw_batched = false;
  if (!MatchesInput(dx->dimensions(), x.dimensions(), g, &dx_batched) ||
      !MatchesInput(dw->dimensions(), w.dimensions(), g, &dw_batched)) {
    return ffi::Error::InvalidArgument(
        "depthwise_conv2d backward: dx " + DimsString(dx->dimensions()) +
        " and dw " + DimsString(dw->dimensions()) + " do not match x " +
        DimsString(x.dimensions()) + ", kernel " + DimsString(w.dimensions()) +
        " and dy " + DimsString(dy.dimensions()));
  }
  GHOSTNET_DISPATCH(g, Backward, Runner{&pool}, g, x.typed_data(),
                    dy.typed_data(), w.typed_data(), dx->typed_data(),
                    dx_batched, dw->typed_data(), dw_batched);
  return ffi::Error::Success();
}

#undef GHOSTNET_DISPATCH

}  // namespace
}  // namespace ghostnet_jax

#define GHOSTNET_DEPTHWISE_ATTRS(binding) \
  binding.Attr<int64_t>("stride_h")       \
      .Attr<int64_t>("stride_w")          \
      .Attr<int64_t>("pad_top")           \
      .Attr<int64_t>("pad_bottom")        \
      .Attr<int64_t>("pad_left")          \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GhostnetDepthwiseForward, ghostnet_jax::ForwardImpl,
    GHOSTNET_DEPTHWISE_ATTRS(ffi::Ffi::Bind()
                                 .Ctx<ffi::ThreadPool>()
                                 .Arg<ghostnet_jax::F32>()      // x
                                 .Arg<ghostnet_jax::F32>()      // w
                                 .Ret<ghostnet_jax::F32>()));   // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GhostnetDepthwiseInputGrad, ghostnet_jax::InputGradImpl,
    GHOSTNET_DEPTHWISE_ATTRS(ffi::Ffi::Bind()
                                 .Ctx<ffi::ThreadPool>()
                                 .Arg<ghostnet_jax::F32>()      // dy
                                 .Arg<ghostnet_jax::F32>()      // w
                                 .Ret<ghostnet_jax::F32>()));   // dx

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GhostnetDepthwiseWeightGrad, ghostnet_jax::WeightGradImpl,
    GHOSTNET_DEPTHWISE_ATTRS(ffi::Ffi::Bind()
                                 .Ctx<ffi::ThreadPool>()
                                 .Arg<ghostnet_jax::F32>()      // x
                                 .Arg<ghostnet_jax::F32>()      // dy
                                 .Ret<ghostnet_jax::F32>()));   // dw

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GhostnetDepthwiseBackward, ghostnet_jax::BackwardImpl,
    GHOSTNET_DEPTHWISE_ATTRS(ffi::Ffi::Bind()
                                 .Ctx<ffi::ThreadPool>()
                                 .Arg<ghostnet_jax::F32>()      // x
                                 .Arg<ghostnet_jax::F32>()      // dy
                                 .Arg<ghostnet_jax::F32>()      // w
                                 .Ret<ghostnet_jax::F32>()      // dx
                                 .Ret<ghostnet_jax::F32>()));   // dw
