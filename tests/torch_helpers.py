"""What the PyTorch reference tests share: float64 leaf tensors, torch autograd of (out * dout).sum(), and the
1e-9 comparison. Imported by test_reference_torch.py and test_methods_torch.py (which skip without torch)."""
import torch

from minilora import backend
from minilora.gradcheck import rel_error

TOL = 1e-9           # relative error against torch autograd, float64


def leaf(a):
    """A float64 torch leaf tensor holding a copy of the array ``a`` (NumPy or CuPy), with requires_grad."""
    return torch.tensor(backend.to_numpy(a), dtype=torch.float64, requires_grad=True)


def torch_reference(fn, inputs, dout):
    """Run ``fn(*tensors)`` in torch autograd and differentiate fakeloss = (out * dout).sum().

    inputs: arrays, made into leaf tensors. Returns (out, [gradient of each input]) as NumPy arrays.
    """
    tensors = [leaf(a) for a in inputs]
    out = fn(*tensors)
    (out * torch.from_numpy(dout)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def assert_close(ours, theirs, what):
    assert ours is not None, f"{what}: minilora returned no gradient"
    ours = backend.to_numpy(ours)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != torch {theirs.shape}"
    err = rel_error(ours, theirs)
    assert err <= TOL, f"{what}: relative error {err:.3e} against torch exceeds {TOL:.0e}"
