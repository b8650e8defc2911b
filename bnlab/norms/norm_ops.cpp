// bnlab's train-mode normalizations as torch operators with their own autograd nodes, both in
// C++, for (n, c) float32 CPU inputs (bnlab/norms/kernel.py):
//
//   torch.ops.bnlab.batch_norm_train     BN (batchnorm.py)
//   torch.ops.bnlab.batch_renorm_train   batch renormalization (batchrenorm.py)
//   torch.ops.bnlab.group_norm           group and layer normalization (groupnorm.py)
//
// The arithmetic is the closed forms of bn_kernel.c and gn_kernel.c, included below. What this
// file adds is the plumbing torch's native layers have and a Python autograd.Function lacks:
// the forward call, the graph node, the saved tensors and the backward call stay in C++. On the
// small MLP that plumbing cost more than the arithmetic (~14% of a training step in Python).
//
// Double backward (create_graph=True): the closed-form backward passes are not differentiable,
// so with grad mode on they call bnlab::batch_norm_backward_graph / group_norm_backward_graph,
// which batchnorm.py and groupnorm.py define with their differentiable formulas (one source
// for those equations).

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#define restrict __restrict__
#include "bn_kernel.c"
#include "gn_kernel.c"
#undef restrict

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* NO_WORKSPACE = "bnlab's normalization kernel could not allocate its workspace";

// The differentiable formula a Python module registered under `name` (double backward).
template <typename Signature>
c10::TypedOperatorHandle<Signature> graph_formula(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using BatchNormGraph = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, double);

// (dx, dgamma, dbeta) from a closed-form backward `kernel(dx, dgamma, dbeta)` (0, or -1 without
// workspace); dx undefined, and NULL for the kernel, when the input needs none.
template <typename Kernel>
variable_list closed_backward(AutogradContext* ctx, const at::Tensor& grad_y, Kernel kernel) {
  const int64_t c = grad_y.size(1);
  // separate tensors, not rows of one: autograd may adopt them as the parameters' .grad
  at::Tensor grad_x = ctx->needs_input_grad(0) ? at::empty_like(grad_y) : at::Tensor();
  at::Tensor grad_weight = at::empty({c}, grad_y.options()), grad_bias = at::empty({c}, grad_y.options());
  TORCH_CHECK(kernel(grad_x.defined() ? grad_x.data_ptr<float>() : nullptr, grad_weight.data_ptr<float>(),
                     grad_bias.data_ptr<float>()) == 0, NO_WORKSPACE);
  return {grad_x, grad_weight, grad_bias};
}

// (dx, d scale, dbeta) of y = scale * x_hat + shift by BN's closed form.
variable_list bn_closed_backward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& x_hat,
                                 const at::Tensor& inv_std, const at::Tensor& scale) {
  return closed_backward(ctx, grad_y, [&](float* dx, float* dscale, float* dbias) {
    return bn_backward(grad_y.const_data_ptr<float>(), x_hat.const_data_ptr<float>(),
                       inv_std.const_data_ptr<float>(), scale.const_data_ptr<float>(), grad_y.size(0),
                       grad_y.size(1), dx, dscale, dbias);
  });
}

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  // y = gamma * x_hat + beta; running estimates updated in place when given (momentum < 0:
  // the cumulative average, torch's momentum=None).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked, double momentum,
                            double eps) {
    const int64_t m = x.size(0), c = x.size(1);
    at::Tensor y = at::empty_like(x), x_hat = at::empty_like(x);
    at::Tensor stats = at::empty({3, c}, x.options());  // mean, squares, inv_std
    float* s = stats.data_ptr<float>();
    TORCH_CHECK(bn_statistics(x.const_data_ptr<float>(), m, c, eps, s, s + c, s + 2 * c) == 0, NO_WORKSPACE);
    bn_normalize(x.const_data_ptr<float>(), s, s + 2 * c, weight.const_data_ptr<float>(),
                 bias.const_data_ptr<float>(), m, c, y.data_ptr<float>(), x_hat.data_ptr<float>());
    if (running_mean.has_value()) {
      bn_running_update(s, s + c, running_mean->data_ptr<float>(), running_var->data_ptr<float>(),
                        num_batches_tracked->data_ptr<int64_t>(), c, m, momentum);
    }
    ctx->save_for_backward({x, x_hat, stats[2], weight});
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    if (!grads[0].defined()) return out;
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &x_hat = saved[1], &inv_std = saved[2], &weight = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph=True: this backward will be differentiated
      static auto graph = graph_formula<BatchNormGraph>("bnlab::batch_norm_backward_graph");
      std::tie(out[0], out[1], out[2]) = graph.call(x, weight, grads[0], eps);
      return out;
    }
    auto closed = bn_closed_backward(ctx, grads[0].contiguous(), x_hat, inv_std, weight);
    std::copy(closed.begin(), closed.end(), out.begin());
    return out;
  }
};

struct BatchRenormTrain : public torch::autograd::Function<BatchRenormTrain> {
  // y = gamma * (x_hat * r + d) + beta with the limits r_max, d_max; the moving mean and sigma
  // (and the counter) updated in place when `update`.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_std, const at::Tensor& num_batches_tracked,
                            double r_max, double d_max, double momentum, double eps, bool update) {
    const int64_t m = x.size(0), c = x.size(1);
    at::Tensor y = at::empty_like(x), x_hat = at::empty_like(x);
    at::Tensor stats = at::empty({7, c}, x.options());  // mean, squares, inv_std, r, d, scale, shift
    float* s = stats.data_ptr<float>();
    TORCH_CHECK(bn_statistics(x.const_data_ptr<float>(), m, c, eps, s, s + c, s + 2 * c) == 0, NO_WORKSPACE);
    brn_correction(s, s + c, running_mean.const_data_ptr<float>(), running_std.const_data_ptr<float>(),
                   weight.const_data_ptr<float>(), bias.const_data_ptr<float>(), m, c, eps, r_max, d_max,
                   s + 3 * c, s + 4 * c, s + 5 * c, s + 6 * c);
    bn_normalize(x.const_data_ptr<float>(), s, s + 2 * c, s + 5 * c, s + 6 * c, m, c, y.data_ptr<float>(),
                 x_hat.data_ptr<float>());
    if (update) {
      brn_running_update(s, s + c, running_mean.data_ptr<float>(), running_std.data_ptr<float>(),
                         num_batches_tracked.data_ptr<int64_t>(), c, m, eps, momentum);
    }
    ctx->save_for_backward({x, x_hat, stats[2], stats[3], stats[4], stats[5], weight});
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    return y;
  }

  // BN's backward with gamma * r for gamma; dgamma = r * sum(dy * x_hat) + d * sum(dy).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(11);
    if (!grads[0].defined()) return out;
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &x_hat = saved[1], &inv_std = saved[2], &r = saved[3], &d = saved[4];
    const at::Tensor &scale = saved[5], &weight = saved[6];
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable in gamma through gamma * r
      static auto graph = graph_formula<BatchNormGraph>("bnlab::batch_norm_backward_graph");
      at::Tensor grad_scale;
      std::tie(out[0], grad_scale, out[2]) = graph.call(x, at::mul(weight, r), grads[0], ctx->saved_data["eps"].toDouble());
      out[1] = at::add(at::mul(grad_scale, r), at::mul(out[2], d));
      return out;
    }
    auto closed = bn_closed_backward(ctx, grads[0].contiguous(), x_hat, inv_std, scale);
    float *dg = closed[1].data_ptr<float>();
    const float *db = closed[2].const_data_ptr<float>(), *rs = r.const_data_ptr<float>(), *ds = d.const_data_ptr<float>();
    for (int64_t j = 0; j < closed[1].numel(); j++) dg[j] = rs[j] * dg[j] + ds[j] * db[j];
    std::copy(closed.begin(), closed.end(), out.begin());
    return out;
  }
};

struct GroupNorm : public torch::autograd::Function<GroupNorm> {
  // y = gamma * x_hat + beta, statistics per row and group of c / groups consecutive columns.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t groups, double eps) {
    const int64_t n = x.size(0), c = x.size(1);
    at::Tensor y = at::empty_like(x), x_hat = at::empty_like(x), inv_std = at::empty({n, groups}, x.options());
    gn_forward(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), bias.const_data_ptr<float>(), n, c,
               groups, eps, y.data_ptr<float>(), x_hat.data_ptr<float>(), inv_std.data_ptr<float>());
    ctx->save_for_backward({x, x_hat, inv_std, weight});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    if (!grads[0].defined()) return out;
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &x_hat = saved[1], &inv_std = saved[2], &weight = saved[3];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    if (at::GradMode::is_enabled()) {  // create_graph=True: this backward will be differentiated
      static auto graph = graph_formula<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>(
          "bnlab::group_norm_backward_graph");
      std::tie(out[0], out[1], out[2]) = graph.call(x, weight, grads[0], groups, ctx->saved_data["eps"].toDouble());
      return out;
    }
    const at::Tensor grad_y = grads[0].contiguous();
    auto closed = closed_backward(ctx, grad_y, [&](float* dx, float* dweight, float* dbias) {
      return gn_backward(grad_y.const_data_ptr<float>(), x_hat.const_data_ptr<float>(),
                         inv_std.const_data_ptr<float>(), weight.const_data_ptr<float>(), grad_y.size(0),
                         grad_y.size(1), groups, dx, dweight, dbias);
    });
    std::copy(closed.begin(), closed.end(), out.begin());
    return out;
  }
};

at::Tensor batch_norm_train(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked, double momentum,
                            double eps) {
  return BatchNormTrain::apply(x, weight, bias, running_mean, running_var, num_batches_tracked,
                               momentum, eps);
}

at::Tensor batch_renorm_train(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& running_mean, const at::Tensor& running_std,
                              const at::Tensor& num_batches_tracked, double r_max, double d_max,
                              double momentum, double eps, bool update) {
  return BatchRenormTrain::apply(x, weight, bias, running_mean, running_std, num_batches_tracked, r_max,
                                 d_max, momentum, eps, update);
}

at::Tensor group_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                      double eps) {
  return GroupNorm::apply(x, weight, bias, groups, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnlab, m) {
  m.def("batch_norm_train(Tensor x, Tensor weight, Tensor bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float momentum, float eps) -> Tensor");
  m.def("batch_renorm_train(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_std, Tensor(c!) num_batches_tracked, float r_max, float d_max, float momentum, "
        "float eps, bool update) -> Tensor");
  m.def("group_norm(Tensor x, Tensor weight, Tensor bias, int groups, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlab, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_train", batch_norm_train);
  m.impl("batch_renorm_train", batch_renorm_train);
  m.impl("group_norm", group_norm);
}
