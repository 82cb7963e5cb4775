// oneDNN 2-D convolutions (NHWC activations, HWIO kernels, f32) as XLA FFI
// custom calls for XLA:CPU: the forward pass, the input gradient and the
// weight gradient. byol/onednn_conv.py registers them and builds the
// jax.custom_vjp convolution on top; build_onednn.py compiles this file.
//
// Why a cache of our own: creating a oneDNN primitive descriptor runs its
// implementation dispatch (tens of microseconds to milliseconds), while a
// step calls each convolution shape many times; so each distinct problem
// (kind, shapes, strides, paddings, thread count) is created once and kept.
// Primitives may run concurrently (XLA:CPU runs independent convolutions on
// its own threads at once), so each call brings its own scratchpad and
// stream (thread-local) and the primitives keep no state between calls.

#include <omp.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Out = ffi::ResultBuffer<ffi::F32, 4>;

enum class Kind : int64_t { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

// One convolution problem: N, H, W, C (input), O, KH, KW, Ho, Wo, strides,
// paddings (top, left, bottom, right), kind, and the OpenMP thread count
// (oneDNN splits the work for the thread count it is created with).
using Key = std::array<int64_t, 17>;

struct Plan {
  dnnl::primitive conv;
  // The primitive's own kernel layout (blocked); HWIO is reordered to or
  // from it around the call when the two differ.
  memory::desc kernel_desc;
  memory::desc hwio_desc;
  bool reorder_kernel = false;
  dnnl::reorder kernel_reorder;  // HWIO -> blocked, or blocked -> HWIO
  memory::desc scratch_desc;
};

const dnnl::engine& Engine() {
  static const dnnl::engine* engine =
      new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Sets the OpenMP thread count of the calling (XLA) thread: each XLA thread
// is the master of its own OpenMP team, so this limits one call only.
void UseThreads(int64_t threads) {
  if (threads > 0 && omp_get_max_threads() != threads) {
    omp_set_num_threads(static_cast<int>(threads));
  }
}

std::unique_ptr<Plan> MakePlan(const Key& k) {
  const int64_t n = k[0], h = k[1], w = k[2], c = k[3], o = k[4], kh = k[5],
                kw = k[6], ho = k[7], wo = k[8];
  const memory::dims strides = {k[9], k[10]};
  const memory::dims pad_l = {k[11], k[12]};
  const memory::dims pad_r = {k[13], k[14]};
  const Kind kind = static_cast<Kind>(k[15]);
  const auto f32 = memory::data_type::f32;
  const memory::desc src({n, c, h, w}, f32, Tag::nhwc);
  const memory::desc dst({n, o, ho, wo}, f32, Tag::nhwc);
  const memory::desc any_kernel({o, c, kh, kw}, f32, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto& eng = Engine();
  const auto algo = dnnl::algorithm::convolution_direct;
  auto plan = std::make_unique<Plan>();
  plan->hwio_desc = memory::desc({o, c, kh, kw}, f32, Tag::hwio);
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, algo, src, any_kernel, dst,
      strides, pad_l, pad_r, attr);
  if (kind == Kind::kForward) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->kernel_desc = fwd.weights_desc();
    plan->scratch_desc = fwd.scratchpad_desc();
  } else if (kind == Kind::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, algo, src, any_kernel, dst, strides, pad_l, pad_r, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(bwd);
    plan->kernel_desc = bwd.weights_desc();
    plan->scratch_desc = bwd.scratchpad_desc();
  } else {
    // NHWC activations as they are: oneDNN's choice of layout (16-channel
    // blocks) plus reorders was no faster at the `local` net's sizes.
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, algo, src, any_kernel, dst, strides, pad_l, pad_r, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(bwd);
    plan->kernel_desc = bwd.diff_weights_desc();
    plan->scratch_desc = bwd.scratchpad_desc();
  }
  plan->reorder_kernel = plan->kernel_desc != plan->hwio_desc;
  if (plan->reorder_kernel) {
    plan->kernel_reorder =
        kind == Kind::kWeightGrad
            ? dnnl::reorder(dnnl::reorder::primitive_desc(
                  eng, plan->kernel_desc, eng, plan->hwio_desc))
            : dnnl::reorder(dnnl::reorder::primitive_desc(
                  eng, plan->hwio_desc, eng, plan->kernel_desc));
  }
  return plan;
}

const Plan& GetPlan(const Key& key) {
  static std::mutex mu;
  static auto* plans = new std::map<Key, std::unique_ptr<Plan>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans->find(key);
  if (it == plans->end()) {
    it = plans->emplace(key, MakePlan(key)).first;
  }
  return *it->second;
}

// A growing per-thread buffer: the scratchpad, and the blocked kernel.
void* ThreadBuffer(int slot, size_t bytes) {
  thread_local std::array<std::vector<char>, 2> buffers;
  auto& b = buffers[slot];
  if (b.size() < bytes) b.resize(bytes);
  return b.data();
}

dnnl::stream& ThreadStream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

ffi::Error Run(Kind kind, const F32& x_or_dy, const F32& w_or_dy,
               F32Out& out, int64_t stride_h, int64_t stride_w,
               int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
               int64_t pad_right, int64_t threads) {
  // x: [N, H, W, C]; dy: [N, Ho, Wo, O]; w: [KH, KW, C, O].
  ffi::Span<const int64_t> x, w, y;
  switch (kind) {
    case Kind::kForward:
      x = x_or_dy.dimensions();
      w = w_or_dy.dimensions();
      y = out->dimensions();
      break;
    case Kind::kInputGrad:
      y = x_or_dy.dimensions();
      w = w_or_dy.dimensions();
      x = out->dimensions();
      break;
    case Kind::kWeightGrad:
      x = x_or_dy.dimensions();
      y = w_or_dy.dimensions();
      w = out->dimensions();
      break;
  }
  if (x[0] != y[0] || x[3] != w[2] || y[3] != w[3]) {
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes");
  }
  UseThreads(threads);
  const Key key = {x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2],
                   stride_h, stride_w, pad_top, pad_left, pad_bottom,
                   pad_right, static_cast<int64_t>(kind),
                   static_cast<int64_t>(omp_get_max_threads())};
  try {
    const Plan& plan = GetPlan(key);
    const auto& eng = Engine();
    auto& stream = ThreadStream();
    memory scratch(plan.scratch_desc, eng,
                   ThreadBuffer(0, plan.scratch_desc.get_size()));
    const auto f32 = memory::data_type::f32;
    memory::desc src_d({x[0], x[3], x[1], x[2]}, f32, Tag::nhwc);
    memory::desc dst_d({y[0], y[3], y[1], y[2]}, f32, Tag::nhwc);
    void* kernel_ptr = kind == Kind::kForward || kind == Kind::kInputGrad
                           ? w_or_dy.untyped_data()
                           : out->untyped_data();
    memory hwio(plan.hwio_desc, eng, kernel_ptr);
    memory kernel = hwio;
    if (plan.reorder_kernel) {
      kernel = memory(plan.kernel_desc, eng,
                      ThreadBuffer(1, plan.kernel_desc.get_size()));
    }
    switch (kind) {
      case Kind::kForward: {
        if (plan.reorder_kernel) {
          plan.kernel_reorder.execute(stream, hwio, kernel);
        }
        memory src(src_d, eng, x_or_dy.untyped_data());
        memory dst(dst_d, eng, out->untyped_data());
        plan.conv.execute(stream, {{DNNL_ARG_SRC, src},
                                   {DNNL_ARG_WEIGHTS, kernel},
                                   {DNNL_ARG_DST, dst},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      }
      case Kind::kInputGrad: {
        if (plan.reorder_kernel) {
          plan.kernel_reorder.execute(stream, hwio, kernel);
        }
        memory diff_dst(dst_d, eng, x_or_dy.untyped_data());
        memory diff_src(src_d, eng, out->untyped_data());
        plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                   {DNNL_ARG_WEIGHTS, kernel},
                                   {DNNL_ARG_DIFF_SRC, diff_src},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      }
      case Kind::kWeightGrad: {
        memory src(src_d, eng, x_or_dy.untyped_data());
        memory diff_dst(dst_d, eng, w_or_dy.untyped_data());
        plan.conv.execute(stream, {{DNNL_ARG_SRC, src},
                                   {DNNL_ARG_DIFF_DST, diff_dst},
                                   {DNNL_ARG_DIFF_WEIGHTS, kernel},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
        if (plan.reorder_kernel) {
          plan.kernel_reorder.execute(stream, kernel, hwio);
        }
        break;
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(F32 x, F32 w, F32Out y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t threads) {
  return Run(Kind::kForward, x, w, y, sh, sw, pt, pb, pl, pr, threads);
}

ffi::Error InputGrad(F32 dy, F32 w, F32Out dx, int64_t sh, int64_t sw,
                     int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                     int64_t threads) {
  return Run(Kind::kInputGrad, dy, w, dx, sh, sw, pt, pb, pl, pr, threads);
}

ffi::Error WeightGrad(F32 x, F32 dy, F32Out dw, int64_t sh, int64_t sw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                      int64_t threads) {
  return Run(Kind::kWeightGrad, x, dy, dw, sh, sw, pt, pb, pl, pr, threads);
}

}  // namespace

#define BYOL_CONV_BINDING                         \
  ffi::Ffi::Bind()                                \
      .Arg<F32>()                                 \
      .Arg<F32>()                                 \
      .Ret<ffi::Buffer<ffi::F32, 4>>()            \
      .Attr<int64_t>("stride_h")                  \
      .Attr<int64_t>("stride_w")                  \
      .Attr<int64_t>("pad_top")                   \
      .Attr<int64_t>("pad_bottom")                \
      .Attr<int64_t>("pad_left")                  \
      .Attr<int64_t>("pad_right")                 \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByolOnednnConvForward, Forward,
                              BYOL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ByolOnednnConvInputGrad, InputGrad,
                              BYOL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ByolOnednnConvWeightGrad, WeightGrad,
                              BYOL_CONV_BINDING);
