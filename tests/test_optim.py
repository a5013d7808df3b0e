"""Regularized: torch's own optimizers as oracles, and everything a drop-in torch optimizer must support."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet, Lasso

import fastreg
from fastreg import Regularized


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def make_data(seed=1, dtype=torch.float64, n=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator, dtype=dtype), torch.randn(n, 3, generator=generator, dtype=dtype)


def train(model, optimizer, steps=10, data=None, scheduler=None):
    x, y = data if data is not None else make_data(dtype=next(model.parameters()).dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return model


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b, exact=True):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


# -- torch optimizers as oracles ---------------------------------------------------------
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_coupled_l2_with_sgd_equals_sgd_weight_decay(momentum, nesterov):
    ours, theirs = make_model(), make_model()
    train(ours, Regularized(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov), l2=0.05))
    train(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.05))
    assert_same(weights(ours), weights(theirs), exact=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoupled_l2_with_adam_equals_adamw(dtype):
    ours, theirs = make_model(dtype=dtype), make_model(dtype=dtype)
    train(ours, Regularized(torch.optim.Adam(ours.parameters(), lr=1e-2), l2=0.1, mode="decoupled"), steps=20)
    train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1), steps=20)
    assert_same(weights(ours), weights(theirs), exact=True)


def test_coupled_l2_with_adam_equals_adam_weight_decay():
    ours, theirs = make_model(), make_model()
    train(ours, Regularized(torch.optim.Adam(ours.parameters(), lr=1e-2), l2=0.1), steps=20)
    train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-2, weight_decay=0.1), steps=20)
    assert_same(weights(ours), weights(theirs), exact=False)


def least_squares(seed=0, n=80, d=12):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    true = np.zeros(d)
    true[:4] = [2.0, -1.5, 0.8, 0.3]
    y = x @ true + 0.3 * rng.standard_normal(n)
    return x, y


def ista(x, y, l1, l2, steps):
    """Proximal gradient on (1/2n)||y - Xw||^2 through Regularized(SGD, decoupled)."""
    n = x.shape[0]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    lipschitz = np.linalg.eigvalsh(x.T @ x / n).max()
    optimizer = Regularized(torch.optim.SGD([w], lr=1.0 / lipschitz), l1=l1, l2=l2, mode="decoupled")
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * ((yt - xt @ w) ** 2).mean()).backward()
        optimizer.step()
    return w.detach().numpy()


def test_decoupled_l1_with_sgd_is_ista_and_matches_sklearn_lasso():
    x, y = least_squares()
    alpha = 0.15
    want = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y).coef_
    got = ista(x, y, l1=alpha, l2=0.0, steps=1500)
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert (want == 0).sum() >= 3, "the oracle must have exact zeros for the pattern check to mean something"
    np.testing.assert_array_equal(got == 0, want == 0)


def test_decoupled_elasticnet_with_sgd_matches_sklearn_elasticnet():
    x, y = least_squares(seed=3)
    alpha, rho = 0.2, 0.6
    want = ElasticNet(alpha=alpha, l1_ratio=rho, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y).coef_
    got = ista(x, y, l1=alpha * rho, l2=alpha * (1 - rho), steps=1500)
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert (want == 0).sum() >= 3
    np.testing.assert_array_equal(got == 0, want == 0)


def test_coupled_l2_with_lbfgs_closure_reaches_ridge_solution():
    x, y = least_squares(seed=5)
    n, l2 = x.shape[0], 0.3
    want = np.linalg.solve(x.T @ x / n + l2 * np.eye(x.shape[1]), x.T @ y / n)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = Regularized(torch.optim.LBFGS([w], lr=1, max_iter=100, tolerance_grad=1e-11, tolerance_change=0.0, line_search_fn="strong_wolfe"), l2=l2)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * ((yt - xt @ w) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        loss = optimizer.step(closure)
    np.testing.assert_allclose(w.detach().numpy(), want, atol=1e-9)
    # the loss handed back includes the penalty: the objective LBFGS minimized
    data_loss = 0.5 * ((yt - xt @ w.detach()) ** 2).mean()
    assert loss.item() > data_loss.item()


def test_decoupled_group_lasso_zeros_whole_tensors():
    model = make_model()
    optimizer = Regularized(torch.optim.SGD(model.parameters(), lr=0.5), group_lasso=0.5, mode="decoupled")
    train(model, optimizer, steps=30)
    zeroed = [name for name, p in model.named_parameters() if (p == 0).all()]
    assert zeroed, "a strong group lasso must zero some whole tensors"
    for _, p in model.named_parameters():
        assert (p == 0).all() or (p != 0).sum() > 0.5 * p.numel(), "group lasso zeros tensors whole, not element by element"


def test_decoupled_l1_gives_exact_zeros_and_coupled_does_not():
    decoupled, coupled = make_model(), make_model()
    train(decoupled, Regularized(torch.optim.SGD(decoupled.parameters(), lr=0.1), l1=0.05, mode="decoupled"), steps=30)
    train(coupled, Regularized(torch.optim.SGD(coupled.parameters(), lr=0.1), l1=0.05, mode="coupled"), steps=30)
    assert sum((p == 0).sum().item() for p in decoupled.parameters()) > 10
    assert sum((p == 0).sum().item() for p in coupled.parameters()) == 0


# -- one layer only, per-group keys, the no-decay helper ------------------------------
def test_regularizing_one_layer_leaves_the_others_identical_to_unregularized():
    plain, one_layer = make_model(), make_model()
    train(plain, torch.optim.Adam(plain.parameters(), lr=1e-2))
    groups = [{"params": one_layer[0].parameters(), "l2": 0.5, "l1": 0.01}, {"params": one_layer[2].parameters()}]
    train(one_layer, Regularized(torch.optim.Adam(groups, lr=1e-2), mode="decoupled"))
    # layer 2 sees layer 0's changed activations, so compare a model whose layer 0 is frozen instead
    frozen_plain, frozen_reg = make_model(), make_model()
    for m in (frozen_plain, frozen_reg):
        m[0].requires_grad_(False)
    train(frozen_plain, torch.optim.Adam(frozen_plain[2].parameters(), lr=1e-2))
    groups = [{"params": frozen_reg[2].parameters()}, {"params": frozen_reg[0].parameters(), "l2": 0.5}]
    train(frozen_reg, Regularized(torch.optim.Adam(groups, lr=1e-2), l2=0.0, mode="decoupled"))
    assert_same(weights(frozen_plain[2]), weights(frozen_reg[2]), exact=True)
    assert not torch.equal(one_layer[0].weight, plain[0].weight)


def test_per_group_strengths_override_defaults_and_are_written_in():
    model = make_model()
    inner = torch.optim.SGD([{"params": model[0].parameters(), "l2": 0.3}, {"params": model[2].parameters()}], lr=0.1)
    optimizer = Regularized(inner, l1=0.01, l2=0.02)
    assert [(g["l1"], g["l2"], g["group_lasso"]) for g in optimizer.param_groups] == [(0.01, 0.3, 0.0), (0.01, 0.02, 0.0)]
    before = weights(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # zero loss gradient: the step is -lr * (l1 sign(w) + l2 w), with each group's own l2
    for (name, p), w in zip(model.named_parameters(), before):
        l2 = 0.3 if name.startswith("0.") else 0.02
        torch.testing.assert_close(p.detach(), w - 0.1 * (0.01 * torch.sign(w) + l2 * w))


def test_param_groups_helper_feeds_the_wrapper_without_double_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = Regularized(torch.optim.AdamW(fastreg.param_groups(model, l2=0.1), lr=1e-3), l1=1e-4, mode="decoupled")
    decay, keep = optimizer.param_groups
    assert decay["l2"] == 0.1 and decay["l1"] == 1e-4 and keep["l1"] == keep["l2"] == 0.0
    assert len(decay["params"]) == 2 and len(keep["params"]) == 4


def test_warns_when_the_inner_optimizer_also_decays():
    model = make_model()
    with pytest.warns(UserWarning, match="also applies weight_decay=0.01 to param group 0"):
        Regularized(torch.optim.AdamW(model.parameters(), lr=1e-3), l2=0.1)
    optimizer = Regularized(torch.optim.SGD(model[0].parameters(), lr=1e-3), l2=0.1)
    with pytest.warns(UserWarning, match="param group 1"):
        optimizer.add_param_group({"params": model[2].parameters(), "weight_decay": 0.5})
    with warnings.catch_warnings():  # the inner optimizer's L2 beside fastreg's L1 alone is no double decay
        warnings.simplefilter("error")
        Regularized(torch.optim.AdamW(make_model().parameters(), lr=1e-3, weight_decay=0.1), l1=1e-4, mode="decoupled")


# -- a real torch.optim.Optimizer -----------------------------------------------------
def test_shares_param_groups_state_and_defaults_with_the_inner_optimizer():
    model = make_model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer = Regularized(inner, l2=0.1)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups is inner.param_groups
    assert optimizer.defaults is inner.defaults
    train(model, optimizer, steps=2)
    assert optimizer.state is inner.state and len(optimizer.state) == 4


def test_lr_scheduler_scales_the_decoupled_decay():
    w = torch.ones(3, requires_grad=True)
    optimizer = Regularized(torch.optim.SGD([w], lr=1.0), l2=0.1, mode="decoupled")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    expected = 1.0
    for lr in (1.0, 0.5, 0.25):
        assert optimizer.param_groups[0]["lr"] == lr
        w.grad = torch.zeros(3)
        optimizer.step()
        scheduler.step()
        expected *= 1 - lr * 0.1
        torch.testing.assert_close(w.detach(), torch.full((3,), expected))


def test_schedulers_accept_the_wrapper():
    model = make_model()
    optimizer = Regularized(torch.optim.SGD(model.parameters(), lr=0.1), l2=0.01)
    schedulers = [
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10),
    ]
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train(model, optimizer, steps=3, scheduler=schedulers[0])
    plateau.step(1.0)
    plateau.step(2.0)
    assert optimizer.param_groups[0]["lr"] < 0.1


def test_grad_scaler_sees_unscaled_grads_and_skipped_steps_skip_decay():
    plain, scaled = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    x, y = make_data(dtype=torch.float32)
    plain_opt = Regularized(torch.optim.SGD(plain.parameters(), lr=0.1), l1=0.01, l2=0.05)
    scaled_opt = Regularized(torch.optim.SGD(scaled.parameters(), lr=0.1), l1=0.01, l2=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(5):
        plain_opt.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        plain_opt.step()
        scaled_opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(scaled(x), y)).backward()
        scaler.step(scaled_opt)
        scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    before = weights(scaled)
    scaled_opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(scaled(x), y) * float("inf")).backward()
    scaler.step(scaled_opt)
    assert_same(weights(scaled), before, exact=True)

    decoupled_model = make_model(dtype=torch.float32)
    decoupled = Regularized(torch.optim.SGD(decoupled_model.parameters(), lr=0.1), l1=0.01, l2=0.05, mode="decoupled")
    before = weights(decoupled_model)
    decoupled.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(decoupled_model(x), y) * float("inf")).backward()
    scaler.step(decoupled)
    assert_same(weights(decoupled_model), before, exact=True)


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_state_dict_resume_continues_bit_identically(mode):
    def build(model):
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        return Regularized(inner, l1=1e-3, l2=0.05, group_lasso=1e-3, mode=mode)

    reference = make_model()
    reference_opt = build(reference)
    train(reference, reference_opt, steps=5)
    checkpoint = io.BytesIO()
    torch.save({"model": reference.state_dict(), "optimizer": reference_opt.state_dict()}, checkpoint)
    train(reference, reference_opt, steps=5)

    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    assert saved["optimizer"]["fastreg"]["mode"] == mode
    resumed = make_model(seed=42)
    resumed.load_state_dict(saved["model"])
    resumed_opt = Regularized(torch.optim.Adam(resumed.parameters(), lr=1e-2), mode="coupled" if mode == "decoupled" else "decoupled")
    resumed_opt.load_state_dict(saved["optimizer"])
    assert resumed_opt.mode == mode and resumed_opt.regularization_defaults["l2"] == 0.05
    train(resumed, resumed_opt, steps=5)
    assert_same(weights(resumed), weights(reference), exact=True)


def test_loads_a_plain_inner_state_dict():
    model = make_model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, inner, steps=2)
    optimizer = Regularized(torch.optim.Adam(model.parameters(), lr=1e-2), l2=0.1)
    optimizer.load_state_dict(inner.state_dict())
    assert optimizer.param_groups[0]["l2"] == 0.1
    assert len(optimizer.state) == 4


def test_bad_config_in_state_dict_is_refused():
    model = make_model()
    optimizer = Regularized(torch.optim.SGD(model.parameters(), lr=0.1), l2=0.1)
    state = optimizer.state_dict()
    state["fastreg"]["defaults"]["l2"] = -1.0
    with pytest.raises(ValueError, match="l2 must be non-negative"):
        optimizer.load_state_dict(state)
    assert optimizer.regularization_defaults["l2"] == 0.1


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_step_with_closure_equals_step_without(mode):
    with_closure, without = make_model(), make_model()
    x, y = make_data()
    opt_a = Regularized(torch.optim.Adam(with_closure.parameters(), lr=1e-2), l1=1e-3, l2=0.1, mode=mode)
    opt_b = Regularized(torch.optim.Adam(without.parameters(), lr=1e-2), l1=1e-3, l2=0.1, mode=mode)
    for _ in range(5):
        def closure():
            opt_a.zero_grad()
            loss = torch.nn.functional.mse_loss(with_closure(x), y)
            loss.backward()
            return loss

        opt_a.step(closure)
        opt_b.zero_grad()
        torch.nn.functional.mse_loss(without(x), y).backward()
        opt_b.step()
    assert_same(weights(with_closure), weights(without), exact=True)


def test_decoupled_closure_equals_adamw_closure():
    ours, theirs = make_model(), make_model()
    x, y = make_data()
    opt_ours = Regularized(torch.optim.Adam(ours.parameters(), lr=1e-2), l2=0.1, mode="decoupled")
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        for _ in range(5):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    assert_same(weights(ours), weights(theirs), exact=True)


def test_step_hooks_zero_grad_and_add_param_group():
    model = make_model()
    optimizer = Regularized(torch.optim.SGD(model[0].parameters(), lr=0.1), l2=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt)))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt)))
    train(model, optimizer, steps=2)
    assert calls == [("pre", optimizer), ("post", optimizer)] * 2
    optimizer.add_param_group({"params": model[2].parameters(), "l1": 0.2})
    assert optimizer.param_groups[1]["l1"] == 0.2 and optimizer.param_groups[1]["l2"] == 0.1
    before = weights(model[2])
    train(model, optimizer, steps=1)
    assert not torch.equal(weights(model[2])[0], before[0])
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    optimizer.zero_grad(set_to_none=False)


def test_state_dict_hooks_run():
    optimizer = Regularized(torch.optim.SGD(make_model().parameters(), lr=0.1), l2=0.1)
    seen = []
    optimizer.register_state_dict_post_hook(lambda opt, sd: seen.append(sorted(sd)))
    optimizer.register_load_state_dict_post_hook(lambda opt: seen.append("loaded"))
    optimizer.load_state_dict(optimizer.state_dict())
    assert seen == [["fastreg", "param_groups", "state"], "loaded"]


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_last_penalty_is_the_penalty_of_the_weights_each_step_starts_from(mode):
    model = make_model()
    optimizer = Regularized(torch.optim.SGD(model.parameters(), lr=0.1), l1=0.01, l2=0.1, group_lasso=0.02, mode=mode)
    assert optimizer.last_penalty is None
    x, y = make_data()
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    want = fastreg.penalty(model.parameters(), l1=0.01, l2=0.1, group_lasso=0.02)
    optimizer.step()
    assert isinstance(optimizer.last_penalty, torch.Tensor) and not optimizer.last_penalty.requires_grad
    torch.testing.assert_close(optimizer.last_penalty, want.detach())


def test_track_penalty_off_skips_the_extra_pass():
    model = make_model()
    optimizer = Regularized(torch.optim.SGD(model.parameters(), lr=0.1), l2=0.1, mode="decoupled", track_penalty=False)
    train(model, optimizer, steps=1)
    assert optimizer.last_penalty is None


def test_tensor_learning_rate():
    ours, theirs = make_model(), make_model()
    lr = torch.tensor(1e-2, dtype=torch.float64)
    train(ours, Regularized(torch.optim.Adam(ours.parameters(), lr=lr.clone()), l2=0.1, mode="decoupled"), steps=5)
    train(theirs, torch.optim.AdamW(theirs.parameters(), lr=lr.clone(), weight_decay=0.1), steps=5)
    assert_same(weights(ours), weights(theirs), exact=True)


def test_params_without_grad_are_not_decayed():
    frozen, trained = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    optimizer = Regularized(torch.optim.SGD([frozen, trained], lr=0.5), l1=0.1, l2=0.2, mode="decoupled")
    trained.grad = torch.zeros(3)
    optimizer.step()
    assert frozen.tolist() == [1.0, 1.0, 1.0]
    assert trained.tolist() == pytest.approx([0.9 - 0.05] * 3)


def test_pickle_and_deepcopy():
    model = make_model()
    optimizer = Regularized(torch.optim.Adam(model.parameters(), lr=1e-2), l2=0.1, mode="decoupled")
    train(model, optimizer, steps=1)
    for clone in (pickle.loads(pickle.dumps(optimizer)), copy.deepcopy(optimizer)):
        assert isinstance(clone, Regularized) and clone.mode == "decoupled"
        assert clone.param_groups is clone.optimizer.param_groups
    assert "Regularized(l1=0.0, l2=0.1" in repr(optimizer)


def test_constructor_errors():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        Regularized(list(model.parameters()), l2=0.1)
    with pytest.raises(ValueError, match="mode must be one of coupled, decoupled, got 'adamw'"):
        Regularized(torch.optim.SGD(model.parameters(), lr=0.1), mode="adamw")
    with pytest.raises(ValueError, match="unknown backend"):
        Regularized(torch.optim.SGD(model.parameters(), lr=0.1), backend="fast")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['l2'\] must be non-negative"):
        Regularized(torch.optim.SGD([{"params": model.parameters(), "l2": -1}], lr=0.1))
    with pytest.raises(ValueError, match="l1 must be finite"):
        Regularized(torch.optim.SGD(model.parameters(), lr=0.1), l1=float("nan"))
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype torch.complex64"):
        Regularized(torch.optim.SGD([complex_param], lr=0.1), l2=0.1)
    inner = Regularized(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already a fastreg.Regularized"):
        Regularized(inner)


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_a_bad_later_group_fails_the_step_before_any_write(mode):
    """Every group is checked before the first is touched: weights and grads stay as they were."""
    model = make_model()
    opt = Regularized(torch.optim.SGD([
        {"params": model[0].parameters()},
        {"params": model[2].parameters()},
    ], lr=0.1), l1=0.1, l2=0.1, mode=mode)
    x, y = make_data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    if mode == "coupled":
        model[2].bias.grad = model[2].weight.grad.view(-1)[:3]  # one buffer behind two grads
        error = r"param_groups\[1\]\['params'\]\[1\].grad shares memory with param_groups\[1\]\['params'\]\[0\].grad"
    else:
        opt.param_groups[1]["lr"] = -1.0
        error = "lr must be non-negative"
    before, grads = weights(model), [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=error):
        opt.step()
    assert_same(weights(model), before)
    assert_same([p.grad for p in model.parameters()], grads)


@pytest.mark.parametrize("make_inner", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
    lambda p: torch.optim.RMSprop(p, lr=1e-2),
    lambda p: torch.optim.Adagrad(p, lr=5e-2),
    lambda p: torch.optim.NAdam(p, lr=1e-2),
], ids=["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "NAdam"])
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_any_optimizer_trains_and_regularizes(make_inner, mode):
    """Regularized(inner, l2) trains as the regularization written by hand around the same
    inner optimizer: ``l2/2 * |w|^2`` in the loss (coupled), or ``w *= 1 - lr*l2`` before
    each step (decoupled)."""
    steps, l2 = 40, 0.5
    by_hand, regularized = make_model(), make_model()
    train(regularized, Regularized(make_inner(regularized.parameters()), l2=l2, mode=mode), steps=steps)
    inner = make_inner(by_hand.parameters())
    x, y = make_data()
    for _ in range(steps):
        inner.zero_grad()
        loss = torch.nn.functional.mse_loss(by_hand(x), y)
        if mode == "coupled":
            loss = loss + l2 / 2 * sum((p * p).sum() for p in by_hand.parameters())
        loss.backward()
        if mode == "decoupled":
            with torch.no_grad():
                for group in inner.param_groups:
                    torch._foreach_mul_(group["params"], 1 - group["lr"] * l2)
        inner.step()
    # fastreg and autograd round l2 * w differently; each step's rounding may grow a little
    # through the optimizer's later steps.
    tol = steps * 100 * torch.finfo(torch.float64).eps
    torch.testing.assert_close(weights(regularized), weights(by_hand), rtol=tol, atol=tol)
    plain = make_model()
    train(plain, make_inner(plain.parameters()), steps=steps)
    assert fastreg.norms(regularized.parameters()).l2_squared < fastreg.norms(plain.parameters()).l2_squared
