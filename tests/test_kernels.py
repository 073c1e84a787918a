"""cnnstudy's CPU max-pool kernel: torch's results bit for bit, where it runs and where not."""

from __future__ import annotations

import pytest
import torch

from cnnstudy import kernels
from cnnstudy.architecture import plan
from cnnstudy.config import compose
from cnnstudy.kernels import PoolMax2d
from cnnstudy.model import build_network

CL = torch.channels_last


@pytest.fixture(scope="module")
def built() -> None:
    done = kernels.build()
    if done.library is None:
        pytest.skip(f"cnnstudy's max-pool kernel is not available here: {done.status}")


def _maps(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """Random maps with what max pooling must get right: NaNs, ties, equal windows."""
    torch.manual_seed(n * 1000 + c * 10 + h)
    x = torch.randn(n, c, h, w)
    x[0, 0, 0, 0] = float("nan")
    x[0, 0, 1, 1] = float("nan")  # two NaNs in one window: torch takes the last
    x[-1, -1, :2, :2] = 1.0  # a four-way tie: the first in the window wins
    x[-1, 0] = 0.5  # a whole map of ties, like MNIST's blank background
    if h > 3:
        x[0, -1, 2, 3] = float("-inf")
    return x.contiguous(memory_format=CL)


SHAPES = [
    (4, 10, 28, 28, 2, 2),  # the seed network's pool
    (3, 1, 9, 9, 2, 2),  # one channel; odd size, a row and a column no window reaches
    (2, 16, 8, 8, 2, 2),  # exactly one vector of channels
    (2, 17, 29, 31, 2, 2),  # one vector and one lane
    (2, 40, 12, 12, 3, 3),
    (2, 5, 11, 11, 3, 2),  # overlapping windows
    (2, 5, 11, 11, 2, 3),  # gaps between windows
    (2, 33, 7, 7, 7, 7),  # a window as large as the map
]


@pytest.mark.parametrize(("n", "c", "h", "w", "k", "s"), SHAPES)
def test_kernel_gives_torchs_max_pool_forward_and_backward(built, n, c, h, w, k, s):
    x = _maps(n, c, h, w)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = PoolMax2d(k, s)(ours)
    expected = torch.nn.MaxPool2d(k, s)(theirs)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=CL)
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert torch.equal(out.isnan(), expected.isnan())
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    # the same argmax in every window, NaNs and ties included
    assert torch.equal(ours.grad, theirs.grad)
    assert ours.grad.is_contiguous(memory_format=CL)


def _kernel_runs(monkeypatch, module: torch.nn.Module, x: torch.Tensor) -> bool:
    calls = []
    apply = kernels._MaxPool.apply
    monkeypatch.setattr(kernels._MaxPool, "apply", lambda *a: calls.append(1) or apply(*a))
    module(x)
    monkeypatch.undo()
    return bool(calls)


def test_kernel_runs_where_it_applies_and_torch_runs_elsewhere(built, monkeypatch):
    x = _maps(2, 10, 8, 8)
    assert _kernel_runs(monkeypatch, PoolMax2d(2, 2), x)
    assert not _kernel_runs(monkeypatch, PoolMax2d(2, 2), x.contiguous())  # NCHW
    assert not _kernel_runs(monkeypatch, PoolMax2d(2, 2), x.double())
    assert not _kernel_runs(monkeypatch, PoolMax2d(2, 2, padding=1), x)
    assert not _kernel_runs(monkeypatch, PoolMax2d(2, 2, ceil_mode=True), x)
    assert not _kernel_runs(monkeypatch, PoolMax2d((2, 3), 2), x)
    assert not _kernel_runs(monkeypatch, PoolMax2d(2, 2, cpu_kernel=False), x)
    # the network cnnstudy builds uses it in channels_last, not with cpu_kernels=False
    cfg = compose([])
    layers = plan(cfg.model, cfg.data)
    image = torch.randn(3, 1, 32, 32).contiguous(memory_format=CL)
    assert _kernel_runs(monkeypatch, build_network(layers).to(memory_format=CL), image)
    off = build_network(layers, cpu_kernels=False).to(memory_format=CL)
    assert not _kernel_runs(monkeypatch, off, image)


def test_training_steps_are_bitwise_equal_with_and_without_the_kernel(built):
    cfg = compose([])
    layers = plan(cfg.model, cfg.data)
    nets = []
    for cpu_kernels in (True, False):
        torch.manual_seed(0)
        net = build_network(layers, cpu_kernels=cpu_kernels).to(memory_format=CL)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 1, 32, 32, generator=gen).contiguous(memory_format=CL)
            y = torch.randint(0, 10, (16,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        nets.append(net.state_dict())
    for name, value in nets[0].items():
        assert torch.equal(value, nets[1][name]), name


def test_without_a_compiler_the_build_says_why_and_torch_pools(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("CNNSTUDY_CACHE", str(tmp_path / "cache"))
    done = kernels._load()
    assert done.library is None
    if "x86-64" in done.status or "Linux" in done.status or "OpenMP" in done.status:
        pytest.skip(done.status)
    assert "no C compiler" in done.status


def test_a_failed_compile_reports_the_compilers_error_and_leaves_no_file(monkeypatch, tmp_path):
    if kernels._unsupported_platform() or kernels._compiler() is None:
        pytest.skip("no C compiler on a supported platform here")
    broken = tmp_path / "maxpool.c"
    broken.write_text('#error "this kernel does not build"\n')
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setenv("CNNSTUDY_CACHE", str(tmp_path / "cache"))
    done = kernels._load()
    assert done.library is None
    assert "this kernel does not build" in done.status
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []
