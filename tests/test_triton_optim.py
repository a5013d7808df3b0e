"""fastreg.AdamW / Adam / SGD stepped by the ``triton`` backend's fused kernels
(fastreg/kernels/triton_optim.py): torch's fused CUDA update (torch >= 2.11), operation for
operation, with fastreg's decay and proximal maps in the same pass.

On a machine with a GPU these run on CUDA tensors against torch's fused CUDA optimizers (one
ulp per step, for ``pow``'s rounding); without one, on CPU tensors under Triton's interpreter
against an emulation of torch's CUDA arithmetic in torch ops (:func:`cuda_adam`,
:func:`cuda_sgd`), every case kept small; its multiply-adds round as the interpreter's
``tl.fma`` does (once from Triton 3.9, twice before: :func:`_kernels_fuse_fma`). The proximal terms' oracle is fastreg's fp64
reference after that update (:class:`Oracle`).
"""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import fastreg
from fastreg import kernels
from fastreg.naive import naive_decay
from test_fused_optim import CASES, THEIRS, ODD_SHAPES, build, make_params, set_grads, sync

pytestmark = pytest.mark.skipif(kernels.triton_import_error() is not None, reason=str(kernels.triton_import_error()))

if kernels.triton_import_error() is None:
    from fastreg.kernels import triton_norms, triton_optim

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def leaves(dtype=torch.float32, seed=0, shapes=ODD_SHAPES):
    return [p.detach().to(DEVICE).requires_grad_() for p in make_params(dtype, seed, shapes)]


def twin(params):
    return [p.detach().clone().requires_grad_() for p in params]


# -- the oracle: torch's fused CUDA update, operation for operation, in torch ops --------------
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sqrt_rn(v):
    """A correctly rounded square root, as CUDA's: torch's on CPU is not (it differs on 20% of
    fp32 values and 1.4% of fp64 ones, torch 2.13), numpy's is."""
    return torch.from_numpy(np.asarray(np.sqrt(v.cpu().numpy()))).to(v.device)


def _kernels_fuse_fma() -> bool:
    """Whether ``tl.fma`` rounds once where the kernels run: on a GPU, and under Triton's
    interpreter from 3.9 on (older ones multiply and add, rounding twice)."""
    if GPU:
        return True
    out = torch.zeros(1)
    one = 1 + 2.0 ** -12
    # (1 + 2^-12)^2 - (1 + 2^-11) is 2^-24 exactly; a rounded product leaves 0
    _fma_probe[(1,)](torch.tensor([one]), torch.tensor([-(1 + 2.0 ** -11)]), out)
    return out.item() != 0


if kernels.triton_import_error() is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _fma_probe(x, c, out):
        tl.store(out, tl.fma(tl.load(x), tl.load(x), tl.load(c)))


def fma(a, b, c):
    """``a * b + c`` in ``c``'s dtype, rounded as the kernels' ``tl.fma`` rounds
    (:func:`_kernels_fuse_fma`). Once: torch has no fma on CPU and fp64 arithmetic would
    round twice, so fp32 goes through fp64 rounded to odd and fp64 through exact fractions."""
    c = torch.as_tensor(c)
    if not FUSED_FMA:
        return torch.as_tensor(a, dtype=c.dtype) * torch.as_tensor(b, dtype=c.dtype) + c
    shape = torch.broadcast_shapes(*(torch.as_tensor(t).shape for t in (a, b, c)))
    x, y, z = (np.array(arr, dtype=np.float64, ndmin=1) for arr in np.broadcast_arrays(
        *(torch.as_tensor(t, dtype=c.dtype).cpu().numpy() for t in (a, b, c))))
    if c.dtype == torch.float64:
        out = np.array([float(Fraction(p) * Fraction(q) + Fraction(r)) for p, q, r in zip(x.ravel(), y.ravel(), z.ravel())])
    else:
        product = x * y  # exact: two 24-bit significands
        total = product + z
        # the rounding error of the sum (Knuth's two-sum), then the sum rounded to odd: a
        # 53-bit result rounded to odd rounds correctly to 24 bits
        back = total - product
        error = (product - (total - back)) + (z - back)
        odd = (total.view(np.int64) & 1) == 1
        total = np.where((error != 0) & ~odd, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
        out = total.astype(np.float32)
    return torch.from_numpy(out.reshape(shape)).to(c.dtype).to(c.device)


FUSED_FMA = kernels.triton_import_error() is None and _kernels_fuse_fma()


def opmath(value, dtype):
    """A hyperparameter rounded to the accumulate dtype of ``dtype``, as torch's kernels take it."""
    return torch.as_tensor(value, dtype=_acc(dtype))


def cuda_adam(p, d, s, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled):
    """torch's fused CUDA ``adam_math`` (torch >= 2.11) on one tensor: in the accumulate dtype
    throughout, with the fmas its build contracts."""
    acc = _acc(p.dtype)
    lr, beta1, beta2, eps, weight_decay = (opmath(v, p.dtype) for v in (lr, *betas, eps, weight_decay))
    s["step"] += 1
    n = s["step"]
    # pow(beta, n) in the accumulate dtype, correctly rounded
    bias_correction1 = 1 - torch.tensor(float(beta1) ** n, dtype=torch.float64).to(acc)
    bias_correction2_sqrt = sqrt_rn(1 - torch.tensor(float(beta2) ** n, dtype=torch.float64).to(acc))
    step_size = lr / bias_correction1
    x, d = p.detach().to(acc), -d.to(acc) if maximize else d.to(acc)
    if weight_decay:
        if decoupled:
            x = fma(-(lr * weight_decay), x, x)
        else:
            d = fma(x, weight_decay, d)
    m = fma(beta1, s["exp_avg"].to(acc), fma(-beta1, d, d))
    v = fma(beta2, s["exp_avg_sq"].to(acc), fma(-beta2, d * d, d * d))
    s["exp_avg"], s["exp_avg_sq"] = m.to(p.dtype), v.to(p.dtype)
    if amsgrad:
        most = s["max_exp_avg_sq"].to(acc)
        v = torch.where(most < v, v, most)
        s["max_exp_avg_sq"] = v.to(p.dtype)
    return x - step_size * m / (sqrt_rn(v) / bias_correction2_sqrt + eps)


def cuda_sgd(p, d, s, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch's fused CUDA ``sgd_math`` (torch >= 2.11) on one tensor, as :func:`cuda_adam`."""
    acc = _acc(p.dtype)
    lr, momentum, dampening, weight_decay = (opmath(v, p.dtype) for v in (lr, momentum, dampening, weight_decay))
    x, d = p.detach().to(acc), -d.to(acc) if maximize else d.to(acc)
    if weight_decay:
        d = fma(weight_decay, x, d)
    if momentum:
        b = d if "momentum_buffer" not in s else momentum * s["momentum_buffer"].to(acc) + (1 - dampening) * d
        s["momentum_buffer"] = b.to(p.dtype)
        d = fma(momentum, b, d) if nesterov else b
    return fma(-lr, d, x)


class Oracle:
    """The step of ``group`` (a fastreg optimizer's param group, or a Regularized one's, whose
    settings it reads): Regularized's ``l2`` decay, :func:`cuda_adam` / :func:`cuda_sgd`, then
    the L1 soft threshold and the group shrink of fastreg's fp64 reference (``naive_decay``)."""

    def __init__(self, name, params, group):
        self.name, self.params, self.group = name, params, group
        self.state = [{} for _ in params]
        if name != "SGD":
            for p, s in zip(params, self.state):
                s.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                         max_exp_avg_sq=torch.zeros_like(p))

    def step(self):
        g = self.group
        if g.get("l2"):
            # Regularized's decoupled decay before the update, by a factor rounded to fp32
            with torch.no_grad():
                for p in self.params:
                    p.mul_(torch.tensor(1 - float(g["lr"]) * g["l2"], dtype=_acc(p.dtype)))
        for p, s in zip(self.params, self.state):
            if self.name == "SGD":
                x = cuda_sgd(p, p.grad, s, g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"],
                             g["maximize"])
            else:
                x = cuda_adam(p, p.grad, s, g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"],
                              g["maximize"], self.name == "AdamW")
            with torch.no_grad():
                p.copy_(x)
        if g["l1"] or g["group_lasso"]:
            decayed = naive_decay(self.params, float(g["lr"]), l1=g["l1"], group_lasso=g["group_lasso"],
                                  group_dim=g.get("group_dim"))
            with torch.no_grad():
                for p, w in zip(self.params, decayed):
                    p.copy_(w)

    def sync_from(self, optimizer, params):
        """Our weights and state become the kernel's, so the next step starts from the same point."""
        with torch.no_grad():
            for p, q, s in zip(params, self.params, self.state):
                q.copy_(p)
                for key, value in optimizer.state[p].items():
                    s[key] = float(value) if key == "step" else value.clone()


def assert_within_ulps(ours, theirs, starts, count, what, threshold=0.0):
    """Each element within ``count`` ulps of the largest of its weights before and after the
    step, of the step's update and of the soft ``threshold`` (``lr*l1``, subtracted in fp32
    by the kernel and in fp64 by the oracle: near it the result keeps the threshold's
    rounding)."""
    for i, (a, b, start) in enumerate(zip(ours, theirs, starts)):
        a, b, start = a.detach().double(), b.detach().double(), start.double()
        largest = torch.stack([a.abs(), b.abs(), start.abs(), (b - start).abs()]).amax(0).clamp_min(threshold)
        bound = count * torch.finfo(ours[0].dtype).eps * largest
        excess = (a - b).abs() / bound.clamp_min(torch.finfo(torch.float64).tiny)
        assert bool(((a - b).abs() <= bound).all()), f"{what}: tensor {i} differs by {excess.max()} of the bound"


def oracle_of(name, params, ours):
    """torch's fused CUDA optimizer on a GPU (without regularization); else its emulation,
    :class:`Oracle`, with ``ours``' settings."""
    group = ours.param_groups[0]
    if GPU and not (group["l1"] or group["group_lasso"]):
        options = {k: v for k, v in ours.defaults.items() if k not in ("l1", "group_lasso", "group_dim")}
        return THEIRS[name](params, **{**options, "fused": True})
    return Oracle(name, params, group)


def steps_within_an_ulp(ours, ours_params, theirs, theirs_params, steps=3):
    for step in range(steps):
        set_grads(step, ours_params, theirs_params)
        starts = [p.detach().clone() for p in ours_params]
        ours.step()
        theirs.step()
        assert_within_ulps(ours_params, theirs_params, starts, 1, f"step {step}")
        if isinstance(theirs, Oracle):
            theirs.sync_from(ours, ours_params)
        else:
            sync(ours, ours_params, theirs, theirs_params)


@pytest.fixture
def launches(monkeypatch):
    """The fused step's kernel launches, in order (kernel names)."""
    recorded = []
    for module, name in ((triton_optim, "steps_kernel"), (triton_optim, "step_kernel"),
                         (triton_optim, "shrink_kernel"), (triton_norms, "finalize_kernel")):
        kernel = getattr(module, name)

        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            recorded.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    return recorded


@pytest.mark.parametrize("name, options", CASES)
def test_matches_torch_within_an_ulp_per_step(launches, name, options):
    ours_params = leaves()
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, backend="triton", **options)
    theirs = oracle_of(name, theirs_params, ours)
    steps_within_an_ulp(ours, ours_params, theirs, theirs_params)
    # a finalize only for a penalty (Adam's and SGD's weight_decay are its L2 term)
    expected = ["steps_kernel"] * (name != "SGD") + ["step_kernel"] + ["finalize_kernel"] * bool(
        ours.param_groups[0]["weight_decay"])
    assert launches == expected * 3


@pytest.mark.parametrize("name, dtype", [("AdamW", torch.float64), ("AdamW", torch.bfloat16), ("SGD", torch.bfloat16)])
def test_other_dtypes(name, dtype):
    options = {"amsgrad": True} if name == "AdamW" else {"momentum": 0.9, "weight_decay": 0.1}
    ours_params = leaves(dtype)
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, backend="triton", **options)
    theirs = oracle_of(name, theirs_params, ours)
    steps_within_an_ulp(ours, ours_params, theirs, theirs_params)


@pytest.mark.parametrize("name, options", [("AdamW", {}), ("Adam", {"weight_decay": 0.1, "amsgrad": True}),
                                           ("SGD", {"momentum": 0.9, "nesterov": True})])
@pytest.mark.parametrize("group_dim", [None, 0])
def test_proximal_terms_and_penalty(launches, name, options, group_dim):
    """l1 and group lasso after the update, with exact zeros; the penalty of the starting
    weights, as fastreg.penalty gives it."""
    l1, group_lasso = 3e-1, 2.0
    ours_params = leaves(shapes=[(64, 48), (77,), (5, 3, 4)])
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, backend="triton", l1=l1, group_lasso=group_lasso, group_dim=group_dim, **options)
    theirs = oracle_of(name, theirs_params, ours)
    weight_decay = ours.param_groups[0]["weight_decay"]
    for step in range(3):
        set_grads(step, ours_params, theirs_params)
        starts = [p.detach().clone() for p in ours_params]
        ours.step()
        theirs.step()
        # the threshold and the shrink are fp32 here and fp64 in the oracle, whose norms are
        # fp64 sums (the kernel's are fp32 block sums)
        assert_within_ulps(ours_params, theirs_params, starts, 4, f"step {step}", threshold=1e-2 * l1)
        expected = fastreg.penalty(starts, l1=l1, l2=weight_decay, group_lasso=group_lasso, group_dim=group_dim,
                                   backend="reference")
        torch.testing.assert_close(ours.last_penalty, expected.to(ours.last_penalty), rtol=4e-6, atol=0)
        zeros = [p.detach() == 0 for p in ours_params]
        assert sum(int(z.sum()) for z in zeros) > 0
        assert all(torch.equal(z, q.detach() == 0) for z, q in zip(zeros, theirs_params))
        theirs.sync_from(ours, ours_params)
    step = ["steps_kernel"] * (name != "SGD") + ["step_kernel", "finalize_kernel", "finalize_kernel", "shrink_kernel"]
    assert launches == step * 3


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_grad_scaler_and_a_skipped_step(name):
    """GradScaler's tensors stay on the device; a step with an inf gradient writes nothing
    (weights, gradients, state, steps) and still gives the penalty."""
    options = {"momentum": 0.9} if name == "SGD" else {}
    ours_params = leaves()
    theirs_params = twin(ours_params)
    ours = build(name, ours_params, backend="triton", l1=1e-2, group_lasso=0.5, **options)
    theirs = oracle_of(name, theirs_params, ours)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10)
    scaler.scale(torch.zeros((), device=DEVICE))
    for step in range(3):
        set_grads(step, ours_params, theirs_params)
        for p in ours_params:
            p.grad.mul_(scaler.get_scale())
        if step == 1:
            ours_params[0].grad[3, 4] = float("inf")
            before = [p.detach().clone() for p in ours_params]
            grads = [p.grad.clone() for p in ours_params]
            state = copy.deepcopy(ours.state_dict()["state"])
        scaler.step(ours)
        scaler.update()
        if step == 1:
            assert all(torch.equal(a.detach(), b) for a, b in zip(ours_params, before))
            assert all(torch.equal(p.grad, g) for p, g in zip(ours_params, grads))
            for index, entry in ours.state_dict()["state"].items():
                for key, value in entry.items():
                    assert torch.equal(value, state[index][key]), key
            expected = fastreg.penalty(before, l1=1e-2, l2=ours.param_groups[0]["weight_decay"], group_lasso=0.5,
                                       backend="reference")
            torch.testing.assert_close(ours.last_penalty, expected.to(ours.last_penalty), rtol=4e-6, atol=0)
            continue
        starts = [p.detach().clone() for p in ours_params]
        theirs.step()
        assert_within_ulps(ours_params, theirs_params, starts, 4, f"step {step}", threshold=1e-2 * 1e-2)
        # the kernel stored the unscaled gradients
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours_params, theirs_params))
        theirs.sync_from(ours, ours_params)


def test_tensor_lr_on_the_device_and_capturable():
    """A tensor lr on the params' device is read by the kernels (on a GPU, capturable groups
    fuse; torch refuses them on CPU); the result is the float lr's."""
    ours_params = leaves()
    theirs_params = twin(ours_params)
    lr = 2.0 ** -7  # the same number as a float32 tensor and as a float
    ours = build("AdamW", ours_params, backend="triton", lr=torch.tensor(lr, device=DEVICE), capturable=GPU, l1=1e-2)
    theirs = build("AdamW", theirs_params, backend="triton", lr=lr, l1=1e-2)
    for step in range(3):
        set_grads(step, ours_params, theirs_params)
        ours.step()
        theirs.step()
    assert ours._tables is not None and len(ours._tables) > 0
    assert all(s["step"].device == DEVICE for s in ours.state.values())
    # the threshold lr*l1 is formed from the tensor in fp32, from the float in fp64
    threshold = torch.finfo(torch.float32).eps * lr * 1e-2
    for a, b in zip(ours_params, theirs_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2 * torch.finfo(torch.float32).eps, atol=4 * threshold)


def test_regularized_routes_torch_fused_adamw_to_the_kernel():
    """Regularized(AdamW(fused=True), mode="decoupled", backend="triton"): one fused step, the
    composition's result (its l2 decays the weights before the update)."""
    ours_params = leaves()
    theirs_params = twin(ours_params)
    # torch's fused AdamW runs on CPU and CUDA
    inner = torch.optim.AdamW(ours_params, lr=1e-2, weight_decay=0.1, fused=True)
    ours = fastreg.Regularized(inner, l1=1e-2, l2=0.5, mode="decoupled", backend="triton")
    theirs = Oracle("AdamW", theirs_params, ours.param_groups[0])
    for step in range(2):
        set_grads(step, ours_params, theirs_params)
        starts = [p.detach().clone() for p in ours_params]
        ours.step()
        theirs.step()
        assert ours.fused
        assert_within_ulps(ours_params, theirs_params, starts, 4, f"step {step}", threshold=1e-2 * 1e-2)
        theirs.sync_from(ours.optimizer, ours_params)


def test_a_backend_that_cannot_run_is_refused_before_anything_is_written():
    params = leaves()
    set_grads(0, params)
    before = [p.detach().clone() for p in params]
    other = "cuda" if DEVICE.type == "cpu" else "cpp"
    optimizer = build("AdamW", params, backend=other, l1=1e-2)
    with pytest.raises(RuntimeError, match=f"backend '{other}' cannot run"):
        optimizer.step()
    assert all(torch.equal(a.detach(), b) for a, b in zip(params, before))
    assert not optimizer.state


COMPILED = [("AdamW", dict(lr=2.0 ** -7, amsgrad=True, l1=1e-2, group_lasso=0.5, group_dim=0)),
            ("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.1, l1=1e-2))]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not GPU, reason="the cuda backend's kernels need a CUDA GPU"))])
@pytest.mark.parametrize("name, options", COMPILED, ids=[name for name, _ in COMPILED])
def test_compiled_step_fullgraph_is_the_eager_step(launches, name, options, backend):
    """``torch.compile(step, fullgraph=True)`` of an optimizer on a CUDA backend: each group's
    step is the ``fastreg::`` op running that backend's kernel (the triton one on CPU tensors
    under the interpreter without a GPU), so the weights, state and penalty are the eager
    step's, bit for bit; a tensor lr, state made on the first compiled step (SGD's new
    buffers), no recompile after it."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled_params = leaves()
    eager_params = twin(compiled_params)
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    compiled = build(name, compiled_params, backend=backend, lr=torch.tensor(lr, device=DEVICE), **options)
    eager = build(name, eager_params, backend=backend, lr=torch.tensor(lr, device=DEVICE), **options)
    step = torch.compile(compiled.step, fullgraph=True)
    try:
        for i in range(3):
            set_grads(i, compiled_params, eager_params)
            with torch._dynamo.config.patch(error_on_recompile=i > 1):
                step()
            eager.step()
            assert all(torch.equal(a, b) for a, b in zip(compiled_params, eager_params)), i
            assert torch.equal(compiled.last_penalty, eager.last_penalty), i
    finally:
        torch._dynamo.reset()
    # three compiled steps and three eager ones, one update pass each
    assert launches.count("step_kernel") == (6 if backend == "triton" else 0)
    for p, q in zip(compiled_params, eager_params):
        assert compiled.state[p].keys() == eager.state[q].keys()
        for key, value in eager.state[q].items():
            assert torch.equal(compiled.state[p][key], value), key
