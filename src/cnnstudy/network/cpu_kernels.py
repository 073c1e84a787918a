"""cnnstudy's own CPU kernels, vectorized across channels, compiled on first use.

torch's channels_last max pool vectorizes over channels and runs a layer with fewer
channels than vector lanes (the seed network's 10 against AVX-512's 16) one channel at a
time: on this project's CPU it took a fifth of the seed network's training step. The C
kernels in csrc/cpu_kernels.c load each pixel's channels with one masked vector load:

- `PoolMax2d`: max pooling with torch's results bit for bit, forward and backward;
- `conv_max_pool`: a first conv layer (stride 1, no padding, input needing no gradient)
  fused with the 2x2/2 max pool after it and a ReLU after that, never storing the conv's
  full-size output; the same function as conv2d + max_pool2d + relu, its sums taken in
  another order (float rounding). `Network` (modules.py) uses it for such layers.

It is built once per machine with the C compiler (`$CC`, else cc/gcc/clang) and
`-march=native -fopenmp`, into cnnstudy's cache folder (`$CNNSTUDY_CACHE/kernels`, else
`~/.cache/cnnstudy/kernels`), keyed by the source, the compiler and the CPU; later
processes load the built library, unless it or its folder could have been written by
another user. A failed build is remembered for its key (a `.failed` file beside it) and
not tried again in every new process. Where it cannot be built (no compiler, a CPU without
AVX-512, not Linux with torch on OpenMP), or for inputs it does not cover (not a float32
channels_last CPU tensor, padding, dilation, ceil_mode, torch.compile/export tracing),
`PoolMax2d` is exactly `nn.MaxPool2d`, and a conv and pool run as themselves.
`trainer.cpu_kernels=false` turns both off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from cnnstudy.cache import cache_root, untrusted

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fopenmp")
MAX_WINDOW = 16  # the argmax's place in its window is stored in a byte: k * k <= 256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Build:
    library: ctypes.CDLL | None
    status: str  # "built" or "loaded" when there is a library, else why there is none


_lock = threading.Lock()
_build: Build | None = None  # one per process, like an import


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _unsupported_platform() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"not built on {sys.platform} (Linux only)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not built on {platform.machine()} (x86-64 with AVX-512 only)"
    if "OpenMP" not in torch.__config__.parallel_info():
        return "not built: torch does not run on OpenMP here"
    return None


def _compile(cc: str, target: Path) -> str | None:
    """Compile SOURCE into target; None on success, else why not (the compiler's last
    error line, or the file system's complaint)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "error" in line]
            return (lines or done.stderr.strip().splitlines() or ["failed"])[-1].strip()
        os.chmod(tmp, 0o755)  # mkstemp made it 0600; no group or other write either way
        os.replace(tmp, target)  # atomic: parallel workers may build the same file
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Build:
    why = _unsupported_platform()
    if why:
        return Build(None, why)
    cc = _compiler()
    if cc is None:
        return Build(None, "not built: no C compiler (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError as err:
        return Build(None, f"not built: {cc}: {err}")
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_identity()]).encode()
    ).hexdigest()[:16]
    folder = cache_root() / "kernels"
    target = folder / f"cpu_kernels-{key}.so"
    failed = target.with_suffix(".failed")  # a failed build, remembered for this key
    status = "loaded"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        return Build(None, f"not built: {err}")
    why = untrusted(folder)
    if why:
        return Build(None, f"not loaded: {why}")
    if failed.exists() and not untrusted(failed) and not target.exists():
        reason = failed.read_text().strip()
        return Build(None, f"not built: {reason} (remembered: delete {failed} to try again)")
    if not target.exists():
        failure = _compile(cc, target)
        if failure:
            try:
                failed.write_text(failure + "\n")
            except OSError:
                pass
            return Build(None, f"not built: {failure}")
        status = "built"
    why = untrusted(target)
    if why:
        return Build(None, f"not loaded: {why}")
    try:
        # torch has loaded its libgomp.so.1 already: the library's libgomp.so.1 resolves to
        # it, so the kernel's OpenMP threads are torch's threads.
        library = ctypes.CDLL(str(target))
    except OSError as err:
        return Build(None, f"not loaded: {err}")
    pointers, sizes = ctypes.c_void_p, ctypes.c_long
    for name, args, result in (
        ("cnnstudy_maxpool_forward", [pointers] * 3 + [sizes] * 6, None),
        ("cnnstudy_maxpool_backward", [pointers] * 3 + [sizes] * 6, None),
        ("cnnstudy_convpool_forward", [pointers] * 5 + [sizes] * 7, None),
        ("cnnstudy_convpool_backward", [pointers] * 5 + [sizes] * 6, ctypes.c_int),
    ):
        function = getattr(library, name)
        function.argtypes, function.restype = args, result
    return Build(library, status)


def build() -> Build:
    """The kernel library, built or loaded once per process; `status` says which, or why not."""
    global _build
    with _lock:
        if _build is None:
            _build = _load()
            if _build.library is None:
                log.info("cnnstudy's CPU kernels %s; using torch's", _build.status)
        return _build


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, s: int) -> torch.Tensor:
        library = build().library
        n, c, h, w = x.shape
        ho, wo = (h - k) // s + 1, (w - k) // s + 1
        out = torch.empty((n, c, ho, wo), memory_format=torch.channels_last)
        where = torch.empty((n, ho, wo, c), dtype=torch.uint8)
        library.cnnstudy_maxpool_forward(
            x.data_ptr(), out.data_ptr(), where.data_ptr(), n, h, w, c, k, s
        )
        ctx.save_for_backward(where)
        ctx.geometry = (n, c, h, w, k, s)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (where,) = ctx.saved_tensors
        n, c, h, w, k, s = ctx.geometry
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_in = torch.empty((n, c, h, w), memory_format=torch.channels_last)
        build().library.cnnstudy_maxpool_backward(
            grad.data_ptr(), where.data_ptr(), grad_in.data_ptr(), n, h, w, c, k, s
        )
        return grad_in, None, None


def _kernel_input(x: torch.Tensor) -> bool:
    """Whether a kernel can take x: a real float32 CPU tensor in channels_last, outside
    torch.compile/export tracing and CPU autocast, with the kernels built."""
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and build().library is not None
    )


class _ConvMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool):
        library = build().library
        n, cin, h, w = x.shape
        cout, _, f, _ = weight.shape
        lanes = -cout % 16
        # weights as (f, f, cin, cout), the order of the input under a filter in NHWC memory
        packed = torch.nn.functional.pad(weight.detach().permute(2, 3, 1, 0), (0, lanes))
        shift = (
            torch.zeros(cout + lanes)
            if bias is None
            else torch.nn.functional.pad(bias.detach(), (0, lanes))
        )
        packed, shift = packed.contiguous(), shift.contiguous()
        ho, wo = (h - f + 1) // 2, (w - f + 1) // 2
        out = torch.empty((n, cout, ho, wo), memory_format=torch.channels_last)
        where = torch.empty((n, ho, wo, cout), dtype=torch.uint8)
        library.cnnstudy_convpool_forward(
            x.data_ptr(),
            packed.data_ptr(),
            shift.data_ptr(),
            out.data_ptr(),
            where.data_ptr(),
            n,
            h,
            w,
            cin,
            f,
            cout,
            int(relu),
        )
        ctx.save_for_backward(x, where)
        ctx.geometry = (n, cin, h, w, f, cout, lanes, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, where = ctx.saved_tensors
        n, cin, h, w, f, cout, lanes, has_bias = ctx.geometry
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_w = torch.empty((f, f, cin, cout + lanes))
        grad_b = torch.empty(cout + lanes)
        failed = build().library.cnnstudy_convpool_backward(
            x.data_ptr(),
            grad.data_ptr(),
            where.data_ptr(),
            grad_w.data_ptr(),
            grad_b.data_ptr(),
            n,
            h,
            w,
            cin,
            f,
            cout,
        )
        if failed:
            raise MemoryError("cnnstudy conv + max pool backward: no memory for its sums")
        grad_w = grad_w[..., :cout].permute(3, 2, 0, 1)
        return None, grad_w, grad_b[:cout] if has_bias else None, None


def conv_max_pool(
    conv: nn.Conv2d, pool: nn.Module, x: torch.Tensor, relu: bool = False
) -> torch.Tensor | None:
    """pool(conv(x)), then torch.relu if `relu`, in one kernel where it applies, else None
    (run the modules one by one).

    It applies to a CPU-kernel PoolMax2d of 2x2 windows, stride 2, after an nn.Conv2d of
    stride 1, no padding, no dilation or groups, few input channels (a first layer: 1 to 4),
    on an input that needs no gradient, with no hooks on either module.
    """
    if not (
        isinstance(pool, PoolMax2d)
        and pool._window == (2, 2)
        and type(conv) is nn.Conv2d
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.in_channels <= 4
        and not (conv._forward_hooks or conv._forward_pre_hooks)
        and not (pool._forward_hooks or pool._forward_pre_hooks)
        and not x.requires_grad
        and x.shape[1] == conv.in_channels
        and min(x.shape[2:]) >= conv.kernel_size[0] + 1
        and conv.weight.dtype == torch.float32
        and conv.weight.device.type == "cpu"
        and _kernel_input(x)
    ):
        return None
    return _ConvMaxPool.apply(x, conv.weight, conv.bias, relu)


def _as_int(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(set(value)) == 1:
        return value[0]
    return None


class PoolMax2d(nn.MaxPool2d):
    """nn.MaxPool2d that runs cnnstudy's CPU kernel where it applies (see the module doc).

    The same module to everything else: its repr, its (empty) state dict, and its results,
    bit for bit, forward and backward.
    """

    def __init__(self, *args, cpu_kernel: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        k, s = _as_int(self.kernel_size), _as_int(self.stride)
        self._window = (
            (k, s)
            if cpu_kernel
            and k is not None
            and s is not None
            and k <= MAX_WINDOW
            and _as_int(self.padding) == 0
            and _as_int(self.dilation) == 1
            and not self.ceil_mode
            and not self.return_indices
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self._window is not None
            and x.dim() == 4
            and min(x.shape[2:]) >= self._window[0]
            and x.numel() > 0
            and _kernel_input(x)
        ):
            return _MaxPool.apply(x, *self._window)
        return super().forward(x)
