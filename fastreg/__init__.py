"""fastreg: fused L1 / L2 / ElasticNet / group-lasso regularization for PyTorch.

    loss = loss + fastreg.penalty(model.parameters(), l1=1e-5, l2=1e-4)
    opt = fastreg.Regularized(torch.optim.AdamW(groups, lr=3e-4), l2=0.1, mode="decoupled")

See ``fastreg.functional`` for the math and ``fastreg.Regularized`` for the optimizer wrapper.
"""
import sys
import warnings

if "torch" not in sys.modules:
    # torch warns at import when NumPy is missing ("Failed to initialize NumPy"), though
    # nothing in fastreg uses NumPy; where fastreg is the first to import torch, that warning
    # is noise in every command's output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
        import torch  # noqa: F401

from .backends import BACKEND_CHOICES
from .functional import Norms, add_penalty_grad_, decay_, norms, penalty
from .fused_optim import SGD, Adam, AdamW
from .groups import param_groups
from .optim import Regularized

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "BACKEND_CHOICES",
    "Norms",
    "Regularized",
    "SGD",
    "add_penalty_grad_",
    "decay_",
    "norms",
    "param_groups",
    "penalty",
]
