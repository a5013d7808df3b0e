"""fastreg.AdamW / Adam / SGD: torch's optimizers of the same name with proximal L1 and group
lasso. With the regularization off they are torch's (bit for bit against torch's fused CPU
kernels for float32 / float64, within an ulp per step against its default path); with it on
they are ``Regularized(torch_optimizer, mode="decoupled")``, exact zeros included. Both paths run:
the fused C++ kernel and the fallback (torch's step and fastreg's decay ops)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastreg
from fastreg import _build, fused_optim

OURS = {"AdamW": fastreg.AdamW, "Adam": fastreg.Adam, "SGD": fastreg.SGD}
THEIRS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
OPTIONS = {
    "AdamW": [{}, {"amsgrad": True}, {"maximize": True}, {"weight_decay": 0.0}, {"betas": (0.5, 0.9), "eps": 1e-3}],
    "Adam": [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "amsgrad": True, "maximize": True}],
    "SGD": [{}, {"weight_decay": 0.1}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.3},
            {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, {"momentum": 0.5, "maximize": True}],
}
CASES = [(name, options) for name, grid in OPTIONS.items() for options in grid]
# Element counts that are multiples of every CPU vector width (up to 32 bf16 lanes): torch's
# fused kernels compute the last numel % width elements of a tensor in scalar code, which can
# round a product-sum differently from the vector fma (one ulp); away from those tails the two
# kernels agree bit for bit. ODD_SHAPES have tails everywhere, for the ulp bounds.
SHAPES = [(64, 48), (96,), (4, 8, 16), (32,)]
ODD_SHAPES = [(300, 70), (77,), (5, 3, 4), (1,)]


@pytest.fixture(params=["fused", "fallback"])
def path(request, monkeypatch):
    """Runs a test on the fused kernel (where the CPU extension builds) and on the fallback."""
    if request.param == "fused":
        reason = _build.cpu_unavailable_reason()
        if reason is not None:
            pytest.skip(f"the CPU extension is not built: {reason}")
    else:
        monkeypatch.setattr(fused_optim, "_kernels", lambda: None)
    return request.param


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() for shape in shapes]


def twin(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(step, *param_lists):
    generator = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
             for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def assert_same_steps(ours, ours_params, theirs, theirs_params, steps=5):
    """``steps`` steps of both optimizers on the same gradients: the same weights and state, bit for bit."""
    for step in range(steps):
        set_grads(step, ours_params, theirs_params)
        ours.step()
        theirs.step()
    assert_equal_lists(ours_params, theirs_params)
    assert_same_state(ours, theirs)


def build(name, params, ours=True, **options):
    options = {"lr": 1e-2, **options}
    if name == "AdamW" and "weight_decay" not in options:
        options["weight_decay"] = 0.1
    return (OURS if ours else THEIRS)[name](params, **options)


def regularized(name, params, l1, group_lasso, group_dim, l2=0.0, fuse=False, **options):
    """``Regularized(torch optimizer, mode="decoupled")``: the composition (the oracle), or with
    ``fuse`` its step routed to the fused kernel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the inner optimizer's own weight_decay is intended
        return fastreg.Regularized(build(name, params, ours=False, **options), l1=l1, l2=l2, group_lasso=group_lasso,
                                   group_dim=group_dim, mode="decoupled", fuse=fuse)


def assert_equal_lists(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x.detach(), y.detach()), f"tensor {i} differs by {(x.detach().double() - y.detach().double()).abs().max()}"


def assert_same_state(ours, theirs):
    for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        a, b = ours.state[p], theirs.state[q]
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]).float(), torch.as_tensor(b[key]).float()), key


def used_fused(optimizer):
    return optimizer._tables is not None and len(optimizer._tables) > 0


# -- without regularization: torch's optimizer ----------------------------------------------
@pytest.mark.parametrize("name, options", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_bit_for_bit(path, name, options, dtype):
    """The fused kernel computes torch's fused CPU update operation for operation; the
    fallback runs torch's own step with the group's settings."""
    ours_params = make_params(dtype)
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, **options)
    theirs = build(name, theirs_params, ours=False, fused=path == "fused", **options)
    assert_same_steps(ours, ours_params, theirs, theirs_params)
    assert used_fused(ours) == (path == "fused")


def assert_within_ulps(ours, theirs, starts, count, what):
    """Each element within ``count`` ulps of the largest of its values before and after the
    step: the paths round the same math differently (an fma or not, in fp32 or not), and a
    weight that the step nearly cancels keeps the rounding error of its operands."""
    for i, (a, b, start) in enumerate(zip(ours, theirs, starts)):
        a, b, start = a.detach().double(), b.detach().double(), start.double()
        bound = count * torch.finfo(ours[0].dtype).eps * torch.maximum(torch.maximum(a.abs(), b.abs()), start.abs())
        excess = (a - b).abs() / bound.clamp_min(torch.finfo(torch.float64).tiny)
        assert bool(((a - b).abs() <= bound).all()), f"{what}: tensor {i} differs by {excess.max()} of the bound"


def sync(ours_optimizer, ours_params, theirs_optimizer, theirs_params):
    """Gives theirs our weights and state, so the next step starts from the same point."""
    with torch.no_grad():
        for p, q in zip(ours_params, theirs_params):
            q.copy_(p)
            for key, value in ours_optimizer.state[p].items():
                theirs_optimizer.state[q][key] = value.clone()


@pytest.mark.parametrize("name, options", CASES)
@pytest.mark.parametrize("dtype, fused", [(torch.float32, False), (torch.float32, True), (torch.float64, True),
                                          (torch.bfloat16, None), (torch.float16, None)])
def test_within_an_ulp_per_step_of_torch(name, options, dtype, fused):
    """From the same state each step, on tensors with tails: within one ulp of torch's fused
    kernel (the same arithmetic; its scalar tail may round a product-sum apart from an fma),
    within four of its default path, which rounds each intermediate (the moments, the
    denominator, the quotient) where ours keeps them in registers; eight in bf16 / fp16, where
    its SGD also rounds the decayed gradient, the momentum buffer and the Nesterov sum. In bf16 / fp16, torch's default Adam computes in that dtype (its eps of 1e-8 is 0
    in fp16) and its fused SGD rounds worse than its default: the references there are its
    fused Adam and its default SGD."""
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip("the CPU extension is not built")
    if fused is None:
        fused = name != "SGD"
    ours_params = make_params(dtype, shapes=ODD_SHAPES)
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, **options)
    theirs = build(name, theirs_params, ours=False, fused=fused, **options)
    for step in range(4):
        set_grads(step, ours_params, theirs_params)
        starts = [p.detach().clone() for p in ours_params]
        ours.step()
        theirs.step()
        assert_within_ulps(ours_params, theirs_params, starts, 1 if fused else 4 if dtype.itemsize >= 4 else 8,
                           f"step {step}")
        sync(ours, ours_params, theirs, theirs_params)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_within_eps_bound_of_torch_default_over_100_steps(name):
    """Per-step ulps accumulate at most linearly: 100 steps stay within 100 ulps of the largest weight."""
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip("the CPU extension is not built")
    options = {"momentum": 0.9} if name == "SGD" else {}
    ours_params = make_params(torch.float32, shapes=[(64, 32), (33,)])
    theirs_params = twin(ours_params)
    ours, theirs = build(name, ours_params, **options), build(name, theirs_params, ours=False, **options)
    for step in range(100):
        set_grads(step, ours_params, theirs_params)
        ours.step()
        theirs.step()
    eps = torch.finfo(torch.float32).eps
    for a, b in zip(ours_params, theirs_params):
        scale = max(a.detach().abs().max().item(), b.detach().abs().max().item())
        assert (a.detach() - b.detach()).abs().max().item() <= 100 * eps * scale


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_adam_matches_torch_fused(name, dtype):
    """bf16 / fp16 weights: computed in fp32 and rounded once, as torch's fused Adam does."""
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip("the CPU extension is not built")
    ours_params = make_params(dtype)
    theirs_params = twin(ours_params)
    ours, theirs = build(name, ours_params, amsgrad=True), build(name, theirs_params, ours=False, fused=True, amsgrad=True)
    assert_same_steps(ours, ours_params, theirs, theirs_params)


def test_tensor_lr_and_mixed_dtypes(path):
    ours_params = make_params(torch.float32) + make_params(torch.float64, seed=3, shapes=[(9, 4)])
    theirs_params = twin(ours_params)
    ours = build("AdamW", ours_params, lr=torch.tensor(3e-3))
    theirs = build("AdamW", theirs_params, ours=False, lr=torch.tensor(3e-3), fused=path == "fused")
    for step in range(3):
        set_grads(step, ours_params, theirs_params)
        ours.step()
        theirs.step()
    assert_equal_lists(ours_params, theirs_params)


def test_params_without_grad_are_left_alone(path):
    ours_params = make_params()
    theirs_params = twin(ours_params)
    ours = build("AdamW", ours_params, l1=1e-2)
    theirs = regularized("AdamW", theirs_params, 1e-2, 0.0, None, fused=path == "fused")
    set_grads(0, ours_params, theirs_params)
    ours_params[1].grad = theirs_params[1].grad = None
    ours.step()
    theirs.step()
    assert_equal_lists(ours_params, theirs_params)
    assert ours_params[1] not in ours.state


# -- with regularization: the Regularized composition -------------------------------------
@pytest.mark.parametrize("name, options", [(n, o) for n, o in CASES if o.get("betas") is None])
@pytest.mark.parametrize("group_dim", [None, 0])
def test_matches_regularized_decoupled(path, name, options, group_dim):
    l1, group_lasso = 3e-1, 2.0
    ours_params = make_params(torch.float32)
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, l1=l1, group_lasso=group_lasso, group_dim=group_dim, **options)
    theirs = regularized(name, theirs_params, l1, group_lasso, group_dim, fused=path == "fused", **options)
    weight_decay = ours.param_groups[0]["weight_decay"]
    for step in range(5):
        set_grads(step, ours_params, theirs_params)
        start = [p.detach().clone() for p in ours_params]
        ours.step()
        theirs.step()
        expected = fastreg.penalty(start, l1=l1, l2=weight_decay, group_lasso=group_lasso, group_dim=group_dim)
        torch.testing.assert_close(ours.last_penalty, expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert_equal_lists(ours_params, theirs_params)
    zeros = sum(int((p == 0).sum()) for p in ours_params)
    assert zeros > 0
    assert zeros == sum(int((p == 0).sum()) for p in theirs_params)
    assert_same_state(ours, theirs.optimizer)


def test_matches_regularized_decoupled_in_float64(path):
    ours_params = make_params(torch.float64)
    theirs_params = twin(ours_params)
    ours = build("AdamW", ours_params, l1=1e-1, group_lasso=1.0, group_dim=0)
    theirs = regularized("AdamW", theirs_params, 1e-1, 1.0, 0, fused=path == "fused")
    for step in range(3):
        set_grads(step, ours_params, theirs_params)
        ours.step()
        theirs.step()
    assert_equal_lists(ours_params, theirs_params)


@pytest.mark.parametrize("name, options", [(n, o) for n, o in CASES if o.get("betas") is None])
@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_regularized_decoupled_step_is_routed_to_the_fused_kernel(path, name, options, l2):
    """Regularized over torch's own fused optimizer runs the fused kernel (its l2 as a decay
    before the update, beside the optimizer's own weight_decay): the composition's weights,
    zeros, state and penalty, bit for bit."""
    routed_params = make_params(torch.float32)
    composed_params = twin(routed_params)
    fused = path == "fused"  # the fallback: torch's default step in both
    routed = regularized(name, routed_params, 3e-1, 2.0, 0, l2=l2, fuse=True, fused=fused, **options)
    composed = regularized(name, composed_params, 3e-1, 2.0, 0, l2=l2, fused=fused, **options)
    for step in range(5):
        set_grads(step, routed_params, composed_params)
        routed.step()
        composed.step()
        assert routed.fused == (path == "fused") and not composed.fused
        assert torch.equal(routed.last_penalty, composed.last_penalty)
    assert_equal_lists(routed_params, composed_params)
    assert sum(int((p == 0).sum()) for p in routed_params) > 0
    assert_same_state(routed.optimizer, composed.optimizer)


def test_regularized_steps_that_are_not_routed(path):
    """The composition runs, unchanged, where the fused kernel would not be the same step."""
    params = make_params()

    def adamw(tensors, cls=torch.optim.AdamW, fused=True):
        return cls(tensors, fused=fused)

    cases = {
        "torch's default implementation": fastreg.Regularized(adamw(twin(params), fused=None), l1=0.1, mode="decoupled"),
        "coupled mode": fastreg.Regularized(adamw(twin(params)), l1=0.1),
        "torch backend": fastreg.Regularized(adamw(twin(params)), l1=0.1, mode="decoupled", backend="torch"),
        "subclass": fastreg.Regularized(adamw(twin(params), type("Mine", (torch.optim.AdamW,), {})), l1=0.1,
                                        mode="decoupled"),
        "step hook": fastreg.Regularized(adamw(twin(params)), l1=0.1, mode="decoupled"),
        "scheduler on the inner optimizer": fastreg.Regularized(adamw(twin(params)), l1=0.1, mode="decoupled"),
        "non-contiguous": fastreg.Regularized(adamw([torch.randn(8, 6).t().requires_grad_()]), l1=0.1, mode="decoupled"),
    }
    calls = []
    cases["step hook"].optimizer.register_step_pre_hook(lambda *args: calls.append(1))
    torch.optim.lr_scheduler.StepLR(cases["scheduler on the inner optimizer"].optimizer, step_size=1)
    for name, optimizer in cases.items():
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        optimizer.step()
        assert not optimizer.fused, name
    assert calls == [1]
    closure_run = fastreg.Regularized(adamw(twin(params)), l1=0.1, mode="decoupled")
    set_grads(0, closure_run.param_groups[0]["params"])
    closure_run.step(lambda: torch.zeros(()))
    assert not closure_run.fused
    routed = fastreg.Regularized(adamw(twin(params)), l1=0.1, mode="decoupled")
    set_grads(0, routed.param_groups[0]["params"])
    routed.step()
    assert routed.fused == (path == "fused")


def test_routed_step_with_a_bad_later_group_writes_nothing(path):
    """A routed step checks Regularized's keys of every group, as the composition does, before
    the first group is written."""
    params = make_params()
    inner = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], weight_decay=0.0, fused=True)
    optimizer = fastreg.Regularized(inner, l1=0.1, l2=0.1, mode="decoupled")
    set_grads(0, params)
    optimizer.param_groups[1]["l2"] = -1.0
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="l2"):
        optimizer.step()
    assert_equal_lists(params, before)
    assert not optimizer.state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_rounds_once(dtype):
    """bf16 / fp16 weights: the fused step keeps the updated weight in fp32 through the soft
    threshold and rounds once; the composition (over torch's fused AdamW, which computes in
    fp32 too) rounds after torch's step and again after fastreg's decay. Per step from the same
    state, they differ by at most those two roundings."""
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip("the CPU extension is not built")
    ours_params = make_params(dtype)
    theirs_params = twin(ours_params)
    ours = build("AdamW", ours_params, l1=1e-1, group_lasso=1.0, group_dim=0)
    theirs = regularized("AdamW", theirs_params, 1e-1, 1.0, 0, fused=True)
    for step in range(3):
        set_grads(step, ours_params, theirs_params)
        starts = [p.detach().clone() for p in ours_params]
        ours.step()
        theirs.step()
        assert_within_ulps(ours_params, theirs_params, starts, 2, f"step {step}")
        sync(ours, ours_params, theirs.optimizer, theirs_params)


def test_penalty_is_bit_identical_to_fastreg_penalty():
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip("the CPU extension is not built")
    params = make_params(torch.float32)
    optimizer = build("Adam", params, weight_decay=0.2, l1=0.1, group_lasso=0.3, group_dim=0)
    set_grads(0, params)
    start = [p.detach().clone() for p in params]
    optimizer.step()
    assert torch.equal(optimizer.last_penalty, fastreg.penalty(start, l1=0.1, l2=0.2, group_lasso=0.3, group_dim=0))


def test_per_group_keys_and_scheduled_lr(path):
    ours_params = make_params()
    theirs_params = twin(ours_params)
    ours = fastreg.AdamW([{"params": ours_params[:2], "l1": 0.2}, {"params": ours_params[2:], "group_lasso": 1.5}],
                         lr=1e-2, l1=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = fastreg.Regularized(torch.optim.AdamW([{"params": theirs_params[:2], "l1": 0.2},
                                                         {"params": theirs_params[2:], "group_lasso": 1.5}],
                                                        lr=1e-2, fused=path == "fused"), l1=0.05, mode="decoupled")
    assert [g["l1"] for g in ours.param_groups] == [0.2, 0.05]
    assert [g["group_lasso"] for g in ours.param_groups] == [0.0, 1.5]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (ours, theirs.optimizer)]
    for step in range(4):
        set_grads(step, ours_params, theirs_params)
        ours.step()
        theirs.step()
        for s in schedulers:
            s.step()
    assert_equal_lists(ours_params, theirs_params)


def test_non_contiguous_params_fall_back_to_the_composition():
    base = torch.randn(40, 30, dtype=torch.float32)
    ours_params = [base.t().contiguous().t().requires_grad_(), torch.randn(12).requires_grad_()]
    assert not ours_params[0].is_contiguous()
    theirs_params = [p.detach().clone().t().contiguous().t().requires_grad_() if not p.is_contiguous() else p.detach().clone().requires_grad_()
                     for p in ours_params]
    ours = build("AdamW", ours_params, l1=0.3)
    theirs = regularized("AdamW", theirs_params, 0.3, 0.0, None)
    for step in range(3):
        set_grads(step, ours_params, theirs_params)
        ours.step()
        theirs.step()
    assert_equal_lists(ours_params, theirs_params)


# -- GradScaler -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_grad_scaler(path, name):
    """scaler.step hands the optimizer grad_scale / found_inf; the step unscales, and a step
    with an inf gradient changes nothing (weights, gradients, state, step counts)."""
    options = {"momentum": 0.9} if name == "SGD" else {}
    ours_params = make_params()
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, l1=1e-2, **options)
    theirs = regularized(name, theirs_params, 1e-2, 0.0, None, fused=path == "fused", **options)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    for scaler in scalers:
        scaler.scale(torch.zeros(()))  # makes the scale, as scaling a loss does
    for step in range(4):
        set_grads(step, ours_params, theirs_params)
        for params in (ours_params, theirs_params):
            for p in params:
                p.grad.mul_(2.0 ** 10)
        if step == 2:
            for params in (ours_params, theirs_params):
                params[0].grad[3, 4] = float("inf")
            before = [p.detach().clone() for p in ours_params]
            grads = [p.grad.clone() for p in ours_params]
            state = copy.deepcopy(ours.state_dict()["state"])
        for scaler, optimizer in zip(scalers, (ours, theirs)):
            scaler.step(optimizer)
            scaler.update()
        if step == 2:
            assert_equal_lists(ours_params, before)
            assert_equal_lists([p.grad for p in ours_params], grads)
            after = ours.state_dict()["state"]
            for index, entry in state.items():
                for key, value in entry.items():
                    assert torch.equal(after[index][key], value), key
            assert ours.last_penalty is not None
    assert_equal_lists(ours_params, theirs_params)
    assert scalers[0].get_scale() == scalers[1].get_scale()


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, error, match", [
    ("AdamW", {"lr": -1.0}, ValueError, "learning rate"),
    ("AdamW", {"betas": (1.0, 0.9)}, ValueError, "beta"),
    ("Adam", {"l1": -1e-3}, ValueError, "l1 must be non-negative"),
    ("SGD", {"group_lasso": float("nan")}, ValueError, "group_lasso must be finite"),
    ("SGD", {"group_dim": 1}, ValueError, "group_dim"),
])
def test_bad_arguments_at_construction(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        build(name, make_params(), **kwargs)


def test_non_float_param_is_refused():
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] has dtype torch.int64"):
        fastreg.AdamW([torch.randn(3, requires_grad=True), torch.zeros(3, dtype=torch.long)])
    optimizer = fastreg.SGD(make_params())
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] has dtype torch.int32"):
        optimizer.add_param_group({"params": [torch.zeros(2, dtype=torch.int32)]})
    assert len(optimizer.param_groups) == 1


def snapshot(optimizer, params):
    return ([p.detach().clone() for p in params], [p.grad.clone() for p in params if p.grad is not None],
            copy.deepcopy(optimizer.state_dict()["state"]))


def assert_unchanged(optimizer, params, saved):
    weights, grads, state = saved
    assert_equal_lists(params, weights)
    assert_equal_lists([p.grad for p in params if p.grad is not None], grads)
    now = optimizer.state_dict()["state"]
    assert set(now) == set(state)
    for index, entry in state.items():
        for key, value in entry.items():
            assert torch.equal(now[index][key], value)


@pytest.mark.parametrize("breakage, error, match", [
    ("lr", ValueError, r"param_groups\[1\]\['lr'\] must be non-negative"),
    ("l1", ValueError, r"param_groups\[1\]\['l1'\] must be non-negative"),
    ("betas", ValueError, r"param_groups\[1\]\['betas'\]\[1\] must be in \[0, 1\)"),
    ("grad", TypeError, r"param_groups\[1\]\['params'\]\[0\]\.grad is torch.float32 \(4, 3\)"),
    ("state", ValueError, r"param_groups\[1\]: state of the param with gradient 0"),
])
@pytest.mark.parametrize("first_step", [False, True], ids=["later_step", "first_step"])
def test_bad_input_at_step_writes_nothing(path, breakage, error, match, first_step):
    """A bad second group raises naming it before the first group is touched: on the first
    step too, where the first group's state is not made."""
    if first_step and breakage == "state":
        pytest.skip("a first step has no state to break")
    first, second = make_params(), make_params(seed=5, shapes=[(6, 2), (4,)])
    optimizer = fastreg.AdamW([{"params": first}, {"params": second}], lr=1e-2, l1=1e-2, group_lasso=0.1)
    if not first_step:
        set_grads(0, first + second)
        optimizer.step()
    set_grads(1, first + second)
    group = optimizer.param_groups[1]
    if breakage == "lr":
        group["lr"] = -1.0
    elif breakage == "l1":
        group["l1"] = -0.5
    elif breakage == "betas":
        group["betas"] = (0.9, 1.5)
    elif breakage == "grad":
        second[0].grad.set_(torch.zeros(4, 3))
    else:
        optimizer.state[second[0]]["exp_avg"] = torch.zeros(5)
    saved = snapshot(optimizer, first + second)
    with pytest.raises(error, match=match):
        optimizer.step()
    assert_unchanged(optimizer, first + second, saved)


# -- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, options", [("AdamW", {"amsgrad": True}), ("Adam", {}), ("SGD", {"momentum": 0.9})])
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_round_trip_with_torch(path, name, options, direction):
    first_params = make_params()
    # torch's side runs its fused kernel where ours does: the two then compute alike.
    torch_options = {**options, "fused": path == "fused"}
    first = build(name, first_params, ours=direction == "ours_to_torch",
                  **(options if direction == "ours_to_torch" else torch_options))
    for step in range(3):
        set_grads(step, first_params)
        first.step()
    state_dict = copy.deepcopy(first.state_dict())
    # The same weights under the other class, then both continue from the checkpoint.
    second_params = twin(first_params)
    second = build(name, second_params, ours=direction != "ours_to_torch",
                   **(torch_options if direction == "ours_to_torch" else options))
    second.load_state_dict(state_dict)
    if direction == "ours_to_torch":
        # The checkpoint's groups carry "fused": None (ours runs its own kernel), which would
        # switch torch's side to its default path.
        for group in second.param_groups:
            group["fused"] = path == "fused"
    if direction == "torch_to_ours":
        assert all(g["l1"] == 0.0 and g["group_lasso"] == 0.0 and g["group_dim"] is None for g in second.param_groups)
    for step in range(3, 6):
        set_grads(step, first_params, second_params)
        first.step()
        second.step()
    assert_equal_lists(first_params, second_params)
    assert_same_state(first, second)


def test_own_state_dict_keeps_regularization_keys(path):
    params = make_params()
    optimizer = build("AdamW", params, l1=0.1, group_lasso=0.2, group_dim=0, track_penalty=False)
    set_grads(0, params)
    optimizer.step()
    assert optimizer.last_penalty is None
    clone_params = twin(params)
    clone = build("AdamW", clone_params)
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not sharing the step tensors
    assert clone.param_groups[0]["l1"] == 0.1 and clone.param_groups[0]["group_dim"] == 0
    copied = copy.deepcopy(optimizer)
    assert copied.track_penalty is False and copied.defaults["group_lasso"] == 0.2
    set_grads(1, params, clone_params)
    optimizer.step()
    clone.step()
    assert_equal_lists(params, clone_params)


# -- the rest of the Optimizer contract --------------------------------------------------------
def test_closure_hooks_and_zero_grad(path):
    params = make_params()
    optimizer = build("Adam", params, weight_decay=0.1, l1=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))

    def closure():
        optimizer.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    assert isinstance(optimizer, torch.optim.Adam)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


# -- the ops torch.compile steps through -------------------------------------------------------
def _op_inputs(name):
    params = [p.detach() for p in make_params(shapes=[(5, 3), (7,)])]
    grads = [torch.randn_like(p) for p in params]
    common = dict(grad_scale=None, found_inf=None, l1=0.01, l2=0.1, group_lasso=0.02, penalty_l2=0.1,
                  row_groups=True, track=True, backend="cpp")
    if name == "adam_step_":
        state = [[torch.rand_like(p) for p in params] for _ in range(3)]
        steps = [torch.tensor(3.0) for _ in params]
        return (params, grads, state[0], state[1], steps, state[2]), dict(
            lr=0.01, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True,
            amsgrad=True, maximize=False, **common)
    buffers = [torch.randn_like(p) for p in params]
    return (params, grads, buffers, torch.tensor([True, False])), dict(
        lr=0.01, lr_tensor=torch.tensor(0.02), momentum=0.9, dampening=0.1, weight_decay=0.1, nesterov=False,
        maximize=False, **common)


@pytest.mark.parametrize("name", ["adam_step_", "sgd_step_"])
def test_step_ops_opcheck(name):
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip(f"the CPU extension is not built: {_build.cpu_unavailable_reason()}")
    args, kwargs = _op_inputs(name)
    torch.library.opcheck(getattr(torch.ops.fastreg, name).default, args, kwargs)


@pytest.mark.parametrize("name", ["adam_step_", "sgd_step_"])
def test_step_ops_refuse_state_unlike_the_params(name):
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip(f"the CPU extension is not built: {_build.cpu_unavailable_reason()}")
    args, kwargs = _op_inputs(name)
    args[2][1] = torch.zeros(8)
    before = [p.clone() for p in args[0]]
    with pytest.raises(RuntimeError, match=rf"fastreg::{name}: \w+\[1\] is torch.float32 \(8,\) on cpu, not a contiguous tensor like params\[1\]"):
        getattr(torch.ops.fastreg, name)(*args, **kwargs)
    assert_equal_lists(args[0], before)


@pytest.mark.parametrize("name", ["adam_step_", "sgd_step_"])
def test_step_ops_refuse_a_backend_without_fused_steps(name):
    if _build.cpu_unavailable_reason() is not None:
        pytest.skip(f"the CPU extension is not built: {_build.cpu_unavailable_reason()}")
    args, kwargs = _op_inputs(name)
    before = [p.clone() for p in args[0]]
    with pytest.raises(RuntimeError, match=rf"fastreg::{name}: backend 'torch' has no fused steps on cpu"):
        getattr(torch.ops.fastreg, name)(*args, **dict(kwargs, backend="torch"))
    assert_equal_lists(args[0], before)


def test_sgd_momentum_over_two_dtypes_in_one_group(path):
    """A group of fp32 and fp64 params is two buckets: each gets its own new-buffer flags."""
    params = make_params()[:2] + make_params(torch.float64, seed=3)[:2]
    twins = twin(params)
    ours = fastreg.SGD(params, lr=0.05, momentum=0.9, dampening=0.2)
    theirs = torch.optim.SGD(twins, lr=0.05, momentum=0.9, dampening=0.2)
    for step in range(3):
        set_grads(step, params, twins)
        ours.step()
        theirs.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=2 * torch.finfo(p.dtype).eps, atol=2 * torch.finfo(p.dtype).eps)


def test_a_compiled_step_leaves_sharded_params_to_the_eager_step():
    """Under torch.compile, a group of DTensors (FSDP2's sharded params) does not become the
    fused op, which has no sharding rule: the trace takes the eager step, which steps them
    unfused with global group norms. Plain tensors in the same setting do become the op."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or _build.cpu_unavailable_reason() is not None:
        pytest.skip("needs torch.distributed and the CPU extension")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        for p, q in zip(plain, sharded):
            p.grad = torch.randn_like(p)
            q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        assert fastreg.AdamW(plain, l1=0.01)._compiled_backends() == ["cpp"]
        assert fastreg.AdamW(sharded, l1=0.01)._compiled_backends() is None
    finally:
        if started:
            dist.destroy_process_group()
