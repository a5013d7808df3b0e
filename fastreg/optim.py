"""``Regularized``: wrap any ``torch.optim.Optimizer`` so each step also applies the penalty."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from . import _calls, _dispatch, fused_optim
from ._dispatch import Coefficients

MODES = ("coupled", "decoupled")
COEFFICIENT_KEYS = ("l1", "l2", "group_lasso")
STATE_KEY = "fastreg"


class _Part(NamedTuple):
    """The tensors of one param group, prepared for a step."""

    call: _calls.Call
    coefs: Coefficients
    group: Dict[str, Any]  # its param group, whose current "lr" the decay reads


class Regularized(torch.optim.Optimizer):
    """A drop-in optimizer that adds L1 / L2 / group-lasso regularization to ``optimizer``.

    Args:
        optimizer: the optimizer to wrap. The wrapper shares its ``param_groups``,
            ``state`` and ``defaults`` (they are the same objects, never copies), so
            schedulers, ``GradScaler``, checkpoints and trainers see one optimizer.
        l1, l2, group_lasso: default strengths (``l2`` has the 1/2, so its
            gradient is ``l2 * w``). A param group's own ``"l1"``, ``"l2"`` or
            ``"group_lasso"`` key overrides the default for that group; groups without
            the keys get the defaults written in, so they show in ``param_groups`` and
            can be scheduled like ``"lr"``.
        mode: ``"coupled"`` adds ``dP/dw`` to every ``.grad`` before the inner step (as
            ``Adam(weight_decay=...)`` does). ``"decoupled"`` multiplies weights by
            ``1 - lr*l2`` before the inner step (as AdamW) and applies the proximal maps
            of the L1 and group-lasso terms after it, which leave exact zeros. ``lr`` is
            each group's current ``"lr"``, so LR schedulers scale the decay too.
        group_dim: ``None`` (each tensor is one group-lasso group) or ``0`` (each slice
            along dim 0 of a tensor with two or more dims).
        backend: ``"auto"``, or a backend name; ``None`` reads ``FASTREG_BACKEND``.
        track_penalty: keep ``P`` of the weights each step starts from in
            :attr:`last_penalty` (a tensor: no host sync). Free in coupled mode; in
            decoupled mode it costs one extra read of the weights, so it can be switched off.
        fuse: in decoupled mode over ``torch.optim.AdamW``, ``Adam`` or ``SGD`` created with
            ``fused=True`` (exactly those classes, with no step hooks of their own), run each
            step as one fused kernel where the backend has one (``cpp`` on CPU, ``triton`` on
            CUDA): the decay, torch's update and the proximal maps in one pass over the
            weights, gradients and state (see :attr:`fused`). The update is torch's fused
            kernel's on that device: on CPU operation for operation, so the step is the
            composition's, bit for bit (but for an ulp in the last elements of a tensor whose
            size is not a multiple of the vector width, which torch's kernel computes in
            scalar code); on CUDA operation for operation, up to the rounding of ``pow``. ``False`` always runs the
            composition.

    With a closure (LBFGS), coupled mode adds the penalty's gradient after every
    evaluation and returns ``loss + P`` to the inner optimizer, so its line search sees
    the objective it descends; decoupled mode decays once, after the first evaluation.
    Under ``torch.amp.GradScaler``, ``scaler.step`` unscales the gradients before calling
    ``step()``, and a skipped step skips the decay too.
    """

    # GradScaler must unscale gradients before step(): coupled decay adds to true gradients.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        l1: float = 0.0,
        l2: float = 0.0,
        group_lasso: float = 0.0,
        *,
        mode: str = "coupled",
        group_dim: Optional[int] = None,
        backend: Optional[str] = None,
        track_penalty: bool = True,
        fuse: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, Regularized):
            raise TypeError("optimizer is already a fastreg.Regularized; wrap the inner optimizer once")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        _dispatch.check_backend_name(backend)
        coefs = _dispatch.make_coefficients(l1, l2, group_lasso, group_dim)
        self.optimizer = optimizer
        self.mode = mode
        self.group_dim = group_dim
        self.backend = backend
        self.track_penalty = bool(track_penalty)
        self.regularization_defaults = {key: getattr(coefs, key) for key in COEFFICIENT_KEYS}
        # A dict rather than an attribute: torch.compile drops attribute assignments made on
        # an Optimizer inside a compiled step (torch 2.13), but replays mutations of a dict.
        self._log: Dict[str, Any] = {"last_penalty": None, "fused": False}
        self.fuse = bool(fuse)
        self._routed = None
        # What torch.optim.Optimizer.__init__ creates; its params logic is the inner optimizer's.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        for index, group in enumerate(self.param_groups):
            self._adopt_group(group, index)

    @property
    def last_penalty(self) -> Optional[Tensor]:
        """``P`` of the weights the last step started from (``None`` before the first step
        or when nothing is regularized), a tensor: reading it does not sync with the device."""
        return self._log["last_penalty"]

    @last_penalty.setter
    def last_penalty(self, value: Optional[Tensor]) -> None:
        self._log["last_penalty"] = value

    # -- shared with the inner optimizer -------------------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> Dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_routed"] = None  # holds cached tables (addresses): rebuilt on the first step
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_routed", None)
        self.__dict__.setdefault("fuse", True)
        self._log.setdefault("fused", False)
        self._patch_step_function()

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v}" for k, v in self.regularization_defaults.items())
        return f"Regularized({config}, mode={self.mode!r}, group_dim={self.group_dim}, backend={self.backend!r},\n{self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._adopt_group(self.param_groups[-1], len(self.param_groups) - 1)

    def _adopt_group(self, group: Dict[str, Any], index: int) -> None:
        """Write the default strengths into a group that lacks them, and check it now, so a
        bad strength or tensor fails here rather than halfway through a step."""
        for key in COEFFICIENT_KEYS:
            group[key] = _dispatch.check_coefficient(f"param_groups[{index}][{key!r}]", group.get(key, self.regularization_defaults[key]))
        if any(group[key] for key in COEFFICIENT_KEYS):
            _dispatch.tensor_list(group["params"], name=f"param_groups[{index}]['params']")
        weight_decay = group.get("weight_decay", 0)
        # Only a second L2 is a likely mistake: the inner optimizer's weight decay beside
        # fastreg's l1 or group lasso alone is the usual way to add those to it.
        if isinstance(weight_decay, (int, float)) and weight_decay > 0 and group["l2"]:
            warnings.warn(
                f"the wrapped {type(self.optimizer).__name__} also applies weight_decay={weight_decay} to param group "
                f"{index}, on top of fastreg's l2={group['l2']}; set weight_decay=0 there (fastreg.param_groups does) "
                "unless you want both",
                UserWarning,
                stacklevel=3,
            )

    # -- the step -------------------------------------------------------------------------
    def _coefficients(self, group: Dict[str, Any]) -> Coefficients:
        return _dispatch.make_coefficients(group_dim=self.group_dim, **{key: group[key] for key in COEFFICIENT_KEYS})

    def _prepare(self, writes_params: bool) -> List[_Part]:
        """Check every param group and prepare its calls before any runs, so that a bad
        tensor in a later group raises before an earlier group is touched.

        Like torch's optimizers, only params that have a gradient are regularized (frozen
        or unused params are neither updated nor decayed): coupled mode writes their grads,
        decoupled mode (``writes_params``) the params. A param group may span devices, and
        device meshes for sharded (DTensor) params.
        """
        parts = []
        for index, group in enumerate(self.param_groups):
            coefs = self._coefficients(group)
            if coefs.is_zero():
                continue
            call = _calls.prepare(_dispatch.as_list(group["params"]), self.backend, with_grads=True,
                                  writes_params=writes_params, name=f"param_groups[{index}]['params']", devices=True)
            parts.append(_Part(call, coefs, group))
        return parts

    def _decay_parts(self, parts: List[_Part], coefs_of: Callable[[Coefficients], Coefficients]) -> None:
        """Decay every part with its group's current lr, all checked before the first write."""
        lrs = [_dispatch.check_lr(part.group["lr"]) for part in parts]
        for part, lr in zip(parts, lrs):
            _calls.decay(part.call, lr, coefs_of(part.coefs))

    def _record(self, values: List[Tensor]) -> None:
        self._log["last_penalty"] = _dispatch.total(values, _dispatch.result_dtype(values), values[0].device) if values else None

    def _add_penalty_grads(self) -> None:
        self._record([_calls.add_grad(part.call, part.coefs) for part in self._prepare(writes_params=False)])

    def _decay_before(self) -> List[_Part]:
        """AdamW's multiplicative decay, before the inner step; returns the prepared calls,
        which :meth:`_prox_after` reuses (the inner step changes values, not tensors)."""
        parts = self._prepare(writes_params=True)
        if self.track_penalty:
            with torch.no_grad():
                self._record([_calls.penalty(part.call, part.coefs) for part in parts])
        self._decay_parts(parts, lambda coefs: coefs.replace(l1=0.0, group_lasso=0.0))
        return parts

    def _prox_after(self, parts: List[_Part]) -> None:
        """The proximal maps of the L1 and group-lasso terms, after the inner step."""
        self._decay_parts(parts, lambda coefs: coefs.replace(l2=0.0))

    def step(self, closure: Optional[Callable[[], Any]] = None):
        if self.mode == "coupled":
            if closure is None:
                self._add_penalty_grads()
                return self.optimizer.step()
            return self.optimizer.step(self._coupled_closure(closure))
        if closure is None:
            if self._fused_step():
                return None
            parts = self._decay_before()
            loss = self.optimizer.step()
        else:
            prepared: List[List[_Part]] = []
            loss = self.optimizer.step(self._decoupled_closure(closure, prepared))
            # A closure that was never evaluated leaves nothing decayed; prepare now.
            parts = prepared[0] if prepared else self._prepare(writes_params=True)
        self._prox_after(parts)
        return loss

    def _fused_step(self) -> bool:
        """Decoupled mode over torch's fused AdamW, Adam or SGD with a fused kernel: the decay,
        the inner update and the proximal maps (and the penalty) in one fused pass per
        (dtype) bucket, the same arithmetic as the composition. False, with nothing written,
        where that cannot run; the composition does."""
        if torch.compiler.is_compiling():
            return False  # the compiled graph holds fastreg's custom ops; the kernel is not one
        self._log["fused"] = False
        if not self.fuse:
            return False
        if self._routed is None:
            self._routed = fused_optim.routed(self.optimizer, self._coefficients, self._log, self.backend) or False
        if self._routed is False:
            return False
        try:
            self._routed.fused_step(self.track_penalty)
        except fused_optim.NotFused:
            return False
        self._log["fused"] = True
        return True

    @property
    def fused(self) -> bool:
        """Whether the last step ran as one fused kernel (decoupled mode over torch's AdamW, Adam
        or SGD with ``fused=True``, on CPU with the C++ extension or on CUDA) rather than the composition
        of fastreg's decay and the inner optimizer's own step; both compute the same update."""
        return bool(self._log.get("fused"))

    def _coupled_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def regularized_closure():
            loss = closure()
            self._add_penalty_grads()
            if loss is None or self.last_penalty is None:
                return loss
            if isinstance(loss, Tensor):
                return loss + self.last_penalty.to(device=loss.device, dtype=loss.dtype)
            return loss + self.last_penalty

        return regularized_closure

    def _decoupled_closure(self, closure: Callable[[], Any], prepared: List[List[_Part]]) -> Callable[[], Any]:
        """Decays once, after the first evaluation (which makes the grads), and leaves the
        prepared calls in ``prepared`` for the proximal maps after the inner step."""
        def regularized_closure():
            loss = closure()
            if not prepared:
                prepared.append(self._decay_before())
            return loss

        return regularized_closure

    # -- checkpoints ----------------------------------------------------------------------
    def _config(self) -> Dict[str, Any]:
        return {
            "defaults": dict(self.regularization_defaults),
            "mode": self.mode,
            "group_dim": self.group_dim,
            "backend": self.backend,
            "track_penalty": self.track_penalty,
        }

    def state_dict(self) -> Dict[str, Any]:
        """The inner optimizer's state dict plus fastreg's config under ``"fastreg"``."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[STATE_KEY] = self._config()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner optimizer)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        config = state_dict.pop(STATE_KEY, None)
        if config is not None:
            if config["mode"] not in MODES:
                raise ValueError(f"state_dict['{STATE_KEY}']['mode'] must be one of {', '.join(MODES)}, got {config['mode']!r}")
            _dispatch.check_backend_name(config["backend"])
            coefs = _dispatch.make_coefficients(group_dim=config["group_dim"], **config["defaults"])
        self.optimizer.load_state_dict(state_dict)
        if config is not None:
            self.regularization_defaults = {key: getattr(coefs, key) for key in COEFFICIENT_KEYS}
            self.mode, self.group_dim = config["mode"], config["group_dim"]
            self.backend, self.track_penalty = config["backend"], config["track_penalty"]
        for index, group in enumerate(self.param_groups):
            self._adopt_group(group, index)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

