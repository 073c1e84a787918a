"""cnnstudy's CPU max-pool kernel: torch's results bit for bit, where it runs and where not."""

from __future__ import annotations

import pytest
import torch

from cnnstudy.config.compose import compose
from cnnstudy.network import cpu_kernels as kernels
from cnnstudy.network.cpu_kernels import PoolMax2d
from cnnstudy.network.modules import build_network
from cnnstudy.network.plan import plan

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


def _uses(monkeypatch, function, module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether module(x) runs `function` (one of the kernels' autograd functions)."""
    calls = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or apply(*a))
    module(x)
    monkeypatch.undo()
    return bool(calls)


def test_pool_kernel_runs_where_it_applies_and_torch_runs_elsewhere(built, monkeypatch):
    x = _maps(2, 10, 8, 8)
    pool = kernels._MaxPool
    assert _uses(monkeypatch, pool, PoolMax2d(2, 2), x)
    assert not _uses(monkeypatch, pool, PoolMax2d(2, 2), x.contiguous())  # NCHW
    assert not _uses(monkeypatch, pool, PoolMax2d(2, 2), x.double())
    assert not _uses(monkeypatch, pool, PoolMax2d(2, 2, padding=1), x)
    assert not _uses(monkeypatch, pool, PoolMax2d(2, 2, ceil_mode=True), x)
    assert not _uses(monkeypatch, pool, PoolMax2d((2, 3), 2), x)
    assert not _uses(monkeypatch, pool, PoolMax2d(2, 2, cpu_kernel=False), x)


def _conv_pool(cin, cout, f, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, f, bias=bias).to(memory_format=CL)
    return conv, PoolMax2d(2, 2)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(
    ("n", "cin", "cout", "f", "h", "w", "bias"),
    [
        (5, 1, 10, 5, 32, 32, True),  # the seed network's first layer
        (3, 1, 16, 3, 13, 16, True),  # odd conv height: a row no window reaches
        (3, 3, 20, 5, 14, 17, False),  # RGB, two vectors of filters, odd pooled width
        (2, 4, 32, 3, 9, 9, True),
    ],
)
def test_fused_conv_and_pool_computes_conv_then_max_pool(built, n, cin, cout, f, h, w, bias, relu):
    conv, pool = _conv_pool(cin, cout, f, bias)
    torch.manual_seed(1)
    x = torch.randn(n, cin, h, w)
    x[0, :, : h // 2] = -0.4  # a blank area: windows of equal conv outputs, as on MNIST
    x = x.contiguous(memory_format=CL)
    fused = kernels.conv_max_pool(conv, pool, x, relu)
    assert fused is not None and fused.is_contiguous(memory_format=CL)
    expected = torch.nn.functional.max_pool2d(conv(x), 2, 2)
    if relu:
        expected = torch.relu(expected)
        assert (fused == 0).any()  # some windows were cut off by the ReLU
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    params = [conv.weight, conv.bias] if bias else [conv.weight]
    grad = torch.randn_like(expected)
    ours = torch.autograd.grad(fused, params, grad)
    theirs = torch.autograd.grad(expected, params, grad)
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
    # deterministic: the same sums in the same order every time
    again = torch.autograd.grad(kernels.conv_max_pool(conv, pool, x, relu), params, grad)
    assert all(torch.equal(a, b) for a, b in zip(again, ours, strict=True))


def test_networks_fuse_a_first_conv_and_pool_only_where_the_kernel_applies(built, monkeypatch):
    fused, pool = kernels._ConvMaxPool, kernels._MaxPool
    layers = plan(compose([]).model, compose([]).data)
    image = torch.randn(3, 1, 32, 32).contiguous(memory_format=CL)
    net = build_network(layers).to(memory_format=CL)
    assert _uses(monkeypatch, fused, net, image)
    assert not _uses(monkeypatch, fused, net, image.clone().requires_grad_())
    assert _uses(monkeypatch, pool, net, image.clone().requires_grad_())
    off = build_network(layers, cpu_kernels=False).to(memory_format=CL)
    assert not _uses(monkeypatch, fused, off, image)
    assert not _uses(monkeypatch, pool, off, image)
    # a hook on the conv sees the conv's own output: the modules run one by one
    handle = net.conv1.register_forward_hook(lambda *a: None)
    assert not _uses(monkeypatch, fused, net, image)
    handle.remove()
    # padding: no fusion, but the pool kernel
    padded = build_network(plan(*_model_data(["model.padding=2"]))).to(memory_format=CL)
    assert not _uses(monkeypatch, fused, padded, image)
    assert _uses(monkeypatch, pool, padded, image)


def _model_data(overrides):
    cfg = compose(overrides)
    return cfg.model, cfg.data


def _train_steps(overrides, cpu_kernels: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = build_network(plan(*_model_data(overrides)), cpu_kernels).to(memory_format=CL)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 1, 32, 32, generator=gen).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.state_dict()


def test_training_with_the_pool_kernel_is_bitwise_torchs(built):
    overrides = ["model.padding=2"]  # no fusion: conv by oneDNN, pool by the kernel
    ours, theirs = _train_steps(overrides, True), _train_steps(overrides, False)
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name


def test_training_with_the_fused_conv_and_pool_follows_torchs(built):
    ours, theirs = _train_steps([], True), _train_steps([], False)
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-4, atol=1e-5)


def test_without_a_compiler_the_build_says_why_and_torch_pools(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("CNNSTUDY_CACHE", str(tmp_path / "cache"))
    done = kernels._load()
    assert done.library is None
    if "x86-64" in done.status or "Linux" in done.status or "OpenMP" in done.status:
        pytest.skip(done.status)
    assert "no C compiler" in done.status
    _torch_pools_when_the_kernels_are_missing(monkeypatch, done)


def _torch_pools_when_the_kernels_are_missing(monkeypatch, done) -> None:
    """With no library, the network runs torch's own max pool and conv: nothing of ours."""
    monkeypatch.setattr(kernels, "_build", done)
    layers = plan(compose([]).model, compose([]).data)
    net = build_network(layers).to(memory_format=CL)
    image = torch.randn(3, 1, 32, 32).contiguous(memory_format=CL)
    torch_pool = []
    monkeypatch.setattr(
        torch.nn.functional, "max_pool2d", _spy(torch.nn.functional.max_pool2d, torch_pool)
    )
    assert not _uses(monkeypatch, kernels._ConvMaxPool, net, image)
    assert not _uses(monkeypatch, kernels._MaxPool, net, image)
    monkeypatch.setattr(
        torch.nn.functional, "max_pool2d", _spy(torch.nn.functional.max_pool2d, torch_pool)
    )
    net(image)
    assert torch_pool  # nn.MaxPool2d.forward ran torch's max pool


def _spy(function, calls: list):
    def spy(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return spy


def test_a_failed_compile_is_reported_and_remembered_not_retried(monkeypatch, tmp_path):
    if kernels._unsupported_platform() or kernels._compiler() is None:
        pytest.skip("no C compiler on a supported platform here")
    broken = tmp_path / "maxpool.c"
    broken.write_text('#error "this kernel does not build"\n')
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setenv("CNNSTUDY_CACHE", str(tmp_path / "cache"))
    done = kernels._load()
    assert done.library is None
    assert "this kernel does not build" in done.status
    (remembered,) = (tmp_path / "cache" / "kernels").iterdir()  # no library, no temp file
    assert remembered.suffix == ".failed"
    compiled = []
    monkeypatch.setattr(kernels, "_compile", lambda *a: compiled.append(a) or "again")
    again = kernels._load()  # the next process: the same key, not compiled again
    assert again.library is None and not compiled
    assert "this kernel does not build" in again.status and "remembered" in again.status


def test_a_cache_folder_that_cannot_be_written_leaves_torchs_kernels(monkeypatch, tmp_path):
    if kernels._unsupported_platform() or kernels._compiler() is None:
        pytest.skip("no C compiler on a supported platform here")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CNNSTUDY_CACHE", str(blocker))
    done = kernels._load()
    assert done.library is None
    assert done.status.startswith("not built: ") and "not-a-folder" in done.status
    _torch_pools_when_the_kernels_are_missing(monkeypatch, done)


_TEAM_SCRIPT = """
import sys
import torch
from cnnstudy.network import cpu_kernels as kernels
from cnnstudy.network.cpu_kernels import PoolMax2d
assert kernels.build().library is not None, kernels.build().status
torch.manual_seed(0)
conv = torch.nn.Conv2d(1, 10, 5).to(memory_format=torch.channels_last)
pool = PoolMax2d(2, 2)
x = torch.randn(64, 1, 32, 32).contiguous(memory_format=torch.channels_last)
grad = torch.randn(64, 10, 14, 14)
grads = [
    torch.autograd.grad(kernels.conv_max_pool(conv, pool, x, True), conv.weight, grad)[0]
    for _ in range(3)
]
torch.save({"grads": grads, "state": conv.state_dict(), "x": x, "grad": grad}, sys.argv[1])
"""


@pytest.mark.parametrize("env", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true"}])
def test_fused_backward_sums_only_the_threads_that_ran(built, env, tmp_path):
    """OpenMP may run fewer threads than omp_get_max_threads(): the weight gradient must
    still be torch's, and the same on every call (no sums of buffers nobody wrote).
    (Under OMP_THREAD_LIMIT=1 torch's own conv backward hangs on this machine: the
    reference is computed here, outside that setting.)"""
    import os
    import subprocess
    import sys

    saved = tmp_path / "grads.pt"
    done = subprocess.run(
        [sys.executable, "-c", _TEAM_SCRIPT, str(saved)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(saved, weights_only=True)
    assert all(torch.equal(g, got["grads"][0]) for g in got["grads"])
    conv = torch.nn.Conv2d(1, 10, 5).to(memory_format=CL)
    conv.load_state_dict(got["state"])
    out = torch.relu(torch.nn.functional.max_pool2d(conv(got["x"]), 2, 2))
    (ref,) = torch.autograd.grad(out, conv.weight, got["grad"])
    # sums of 64 x 14 x 14 terms of up to ~400 in another order: float rounding, relative
    # to the gradient's size (the bug this guards against gave values around 1e38)
    scale = float(ref.abs().max())
    torch.testing.assert_close(got["grads"][0], ref, rtol=1e-4, atol=1e-5 * scale)


def test_a_kernel_file_another_user_could_write_is_not_loaded(built, monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("CNNSTUDY_CACHE", str(tmp_path / "cache"))
    first = kernels._load()
    assert first.library is not None and first.status == "built"
    (library,) = (tmp_path / "cache" / "kernels").glob("*.so")
    os.chmod(library, 0o777)  # anyone may replace the code this process would run
    refused = kernels._load()
    assert refused.library is None
    assert "not loaded" in refused.status and "writable by group or others" in refused.status
    os.chmod(library, 0o755)
    os.chmod(tmp_path / "cache" / "kernels", 0o777)
    refused = kernels._load()
    assert refused.library is None and "kernels is writable" in refused.status
