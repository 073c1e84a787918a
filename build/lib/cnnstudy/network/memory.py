"""How much memory a network needs to train, from its shape plan, before anything exists.

Float32 values, 4 bytes each: per parameter the weight, its gradient and the optimizer's
state (two values for Adam); per output value of every layer, at the batch size, the
activation and its gradient. A lower bound: framework buffers and the data come on top.
"""

from __future__ import annotations

from cnnstudy.network.plan import Layer

FLOAT = 4
OPTIMIZER_STATES = 2  # Adam and AdamW keep two values per parameter; SGD with momentum one


def layer_bytes(layer: Layer, batch_size: int) -> int:
    return (2 + OPTIMIZER_STATES) * FLOAT * layer.params + 2 * FLOAT * layer.outputs * batch_size


def training_bytes(layers: list[Layer], batch_size: int) -> tuple[int, Layer]:
    """(bytes to train, the layer needing the most)."""
    sizes = [(layer_bytes(layer, batch_size), layer) for layer in layers]
    return sum(b for b, _ in sizes), max(sizes, key=lambda s: s[0])[1]


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def fits_message(layers: list[Layer], batch_size: int, available: int, where: str) -> str | None:
    """None when training fits in `available` bytes, else the message saying what does not."""
    need, largest = training_bytes(layers, batch_size)
    if need <= available:
        return None
    share = layer_bytes(largest, batch_size)
    return (
        f"the network needs at least {gib(need)} to train at data.batch_size={batch_size} "
        f"(weights, gradients, Adam's state, activations), more than the {gib(available)} "
        f"{where}; the largest is {largest.name} ({largest.kind}, weights "
        f"{'x'.join(map(str, largest.weight_shape or ())) or '-'}, {largest.params:,} "
        f"parameters, {gib(share)}). Make it smaller (model.hidden_units, model.filters, "
        f"more pooling) or the batch smaller (data.batch_size)"
    )
