"""scripts/refine_kernels.py's --perturb: another kernel's last bits, emulated at a chosen size."""
import importlib.util

import pytest
import torch

import dode
from dode.tools import reproduce

SPEC = importlib.util.spec_from_file_location("refine_kernels", reproduce.ROOT / "scripts" / "refine_kernels.py")
refine_kernels = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(refine_kernels)


def test_a_perturbed_model_moves_each_output_by_at_most_half_the_width_and_keeps_the_gradient():
    plain, nudged = dode.load_model("gmm-digits"), refine_kernels.perturbed(dode.load_model("gmm-digits"), 1e-9)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    t = torch.tensor(500.0)
    a, b = plain(x, t), nudged(x, t)
    moved = (b - a).abs()
    assert 0 < moved.max() <= 0.5e-9 * a.abs().max() and (moved > 0).float().mean() > 0.9
    assert torch.equal(b - a, nudged(x, t) - a)  # the same pattern every call: a fixed kernel, not noise
    grad_a, = torch.autograd.grad(a.sum(), x)
    grad_b, = torch.autograd.grad(b.sum(), x)
    assert torch.equal(grad_a, grad_b)


def test_a_perturbation_must_have_a_width(capsys):
    with pytest.raises(SystemExit):
        refine_kernels.main(["--perturb", "0"])
    assert "--perturb must be a width > 0" in capsys.readouterr().err
