"""Pictures of a trained network, logged to its MLflow run (`logger.log_images`):

    pictures/filters_conv1.png        the learned first-layer filters, one tile each
                                      (1D: each filter's weights as curves, one a channel;
                                      3D: each filter's middle slice along depth or time)
    pictures/feature_maps_convN.png   what each conv layer makes of one test image (2D)
    pictures/confusion_matrix.png     true class against predicted class, test split
    pictures/misclassified.png        up to 16 misclassified test images, predicted / true
                                      (1D: the series as curves; 3D: each clip's frames)
    pictures/predicted_vs_true.png    a regression's test predictions against the truth

One inference pass over the test split (the network in eval mode), then drawing:
`benchmarks/pictures.py` measures what it costs.
"""

from __future__ import annotations

import io
from typing import Any

TILE = 48  # pixels a side for a filter or a feature map
MISCLASSIFIED = 16


def _tiles(maps: Any, columns: int) -> Any:
    """A grid image (PIL, grayscale or RGB) of maps (N, C, H, W), each scaled to 0-255
    on its own and enlarged to TILE pixels a side with nearest-neighbour pixels."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    maps = maps.detach().float().cpu()
    low = maps.amin(dim=(1, 2, 3), keepdim=True)
    high = maps.amax(dim=(1, 2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    scale = max(1, TILE // max(maps.shape[-2:]))
    maps = torch.nn.functional.interpolate(maps, scale_factor=scale, mode="nearest")
    grid = make_grid(maps, nrow=columns, padding=2, pad_value=1.0)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    if maps.shape[1] == 1:
        return Image.fromarray(array[0].numpy(), mode="L")
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


def _conv_outputs(network: Any, image: Any) -> list[tuple[str, Any]]:
    """(name, output) of every conv layer for one image, module by module."""
    import torch

    outputs = []
    x = image
    with torch.inference_mode():
        for name, module in network.named_children():
            x = module(x)
            if isinstance(module, torch.nn.Conv2d):
                outputs.append((name, x))
    return outputs


def _predictions(
    network: Any, loader: Any, target: tuple[float, float] | None = None
) -> tuple[Any, Any, list[tuple[Any, int, int]]]:
    """(true labels, predicted labels, up to 16 misclassified (image, predicted, true));
    for a regression (`target`: the targets' mean and std), the predictions in the
    targets' units and no misclassified list."""
    import torch

    device = next(network.parameters()).device
    truths, preds, wrong = [], [], []
    with torch.inference_mode():
        for images, labels in loader:
            images = images.to(device)
            if target is not None:
                preds.append(network(images).squeeze(1).float().cpu() * target[1] + target[0])
                truths.append(labels.cpu())
                continue
            predicted = network(images).argmax(dim=1).cpu()
            truths.append(labels.cpu())
            preds.append(predicted)
            if len(wrong) < MISCLASSIFIED:
                for i in (predicted != labels.cpu()).nonzero().flatten().tolist():
                    wrong.append((images[i].cpu(), int(predicted[i]), int(labels[i])))
                    if len(wrong) == MISCLASSIFIED:
                        break
    return torch.cat(truths), torch.cat(preds), wrong


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _confusion_png(truths: Any, preds: Any, classes: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    n = len(classes)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (truths.numpy(), preds.numpy()), 1)
    size = 2.0 + 0.45 * n
    figure = Figure(figsize=(size, size))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n), classes, fontsize=7, rotation=90 if n > 12 else 0)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    ax.set_title(f"test split: {matrix.sum():,} images, accuracy {accuracy:.2%}", fontsize=9)
    figure.tight_layout()
    return _figure_png(figure)


def _misclassified_png(wrong: list[tuple[Any, int, int]], classes: list[str]) -> bytes:
    """A strip of tiles, each captioned `predicted / true` (drawn with PIL: a figure with
    16 axes costs matplotlib a good part of a second)."""
    from PIL import Image, ImageDraw, ImageFont

    big = 2 * TILE
    caption = 16
    count = max(1, len(wrong))
    strip = Image.new("RGB", (count * (big + 4) + 4, big + caption + 24), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=11)
    draw.text((4, 2), "misclassified test images: predicted / true", fill="black", font=font)
    if not wrong:
        draw.text((4, 24), "none", fill="black", font=font)
    for k, (image, predicted, true) in enumerate(wrong):
        tile = _tiles(image.unsqueeze(0), columns=1).resize((big, big), Image.NEAREST)
        x = 4 + k * (big + 4)
        label = f"{classes[predicted]} / {classes[true]}"[:14]
        draw.text((x, 20), label, fill="#b00020", font=font)
        strip.paste(tile.convert("RGB"), (x, 20 + caption))
    return _png(strip)


def _curves_png(items: list[tuple[Any, str]], title: str, color: str = "black") -> bytes:
    """Small line plots, four a row: each item (C x L weights or values, caption), its
    channels as curves (up to 6; more are averaged into one)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    count = max(1, len(items))
    columns = min(4, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(2.2 * columns, 1.5 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(items):
            ax.axis("off")
            continue
        values, caption = items[k]
        values = values.detach().float().cpu()
        if values.shape[0] > 6:
            values = values.mean(0, keepdim=True)
        marker = "o" if values.shape[-1] <= 16 else None
        for channel in values:
            ax.plot(channel.numpy(), linewidth=1, marker=marker, markersize=2)
        ax.set_title(caption, fontsize=8, color=color)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _figure_png(figure)


def _frames_png(wrong: list[tuple[Any, int, int]], classes: list[str]) -> bytes:
    """3D: one row a misclassified clip, its frames (depth slices) left to right, each row
    captioned `predicted / true`."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    rows = [
        (
            _tiles(clip.mean(0).unsqueeze(1), columns=clip.shape[1]).convert("RGB"),
            f"{classes[predicted]} / {classes[true]}"[:14],
        )
        for clip, predicted, true in wrong[:8]
    ]
    width = max([r.width for r, _ in rows] + [300]) + 110
    height = 24 + sum(r.height + 4 for r, _ in rows) + (20 if not rows else 0)
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((4, 2), "misclassified test clips, frame by frame: predicted / true", fill="black")
    y = 24
    if not rows:
        draw.text((4, y), "none", fill="black", font=font)
    for row, caption in rows:
        draw.text((4, y + row.height // 2 - 6), caption, fill="#b00020", font=font)
        strip.paste(row, (106, y))
        y += row.height + 4
    return _png(strip)


def _predicted_png(truths: Any, preds: Any) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    truths, preds = truths.double(), preds.double()
    rmse = float((preds - truths).square().mean().sqrt())
    spread = float((truths - truths.mean()).square().sum())
    r2 = 1 - float((preds - truths).square().sum()) / spread if spread > 0 else float("nan")
    figure = Figure(figsize=(4.2, 4.2))
    ax = figure.subplots()
    ax.scatter(truths.numpy(), preds.numpy(), s=10, alpha=0.7)
    low = float(min(truths.min(), preds.min()))
    high = float(max(truths.max(), preds.max()))
    ax.plot([low, high], [low, high], color="gray", linewidth=1, linestyle="--")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(f"test split: {len(truths)} samples, RMSE {rmse:.4g}, R² {r2:.3f}", fontsize=9)
    figure.tight_layout()
    return _figure_png(figure)


def pictures(
    network: Any, loader: Any, classes: list[str], target: tuple[float, float] | None = None
) -> dict[str, bytes]:
    """PNG bytes by artifact path: for the network's dimensionality (1D, 2D, 3D: its
    first conv layer's), and for a classification or a regression (`target`: the
    targets' mean and std, which the network's output is standardized by)."""
    import math

    network = network.eval()
    out: dict[str, bytes] = {}
    convs = [m for m in network.modules() if m.__class__.__name__.startswith("Conv")]
    dims = next(iter(loader))[0].dim() - 2
    if convs:
        weight = convs[0].weight.detach()
        if dims == 1:
            shown = [(w, f"filter {i + 1}") for i, w in enumerate(weight[:16])]
            out["pictures/filters_conv1.png"] = _curves_png(shown, "conv1 filters")
        else:
            if dims == 3:  # the middle slice along depth or time
                weight = weight[:, :, weight.shape[2] // 2]
            if weight.shape[1] not in (1, 3):
                weight = weight.mean(dim=1, keepdim=True)
            out["pictures/filters_conv1.png"] = _png(_tiles(weight, columns=8))
    truths, preds, wrong = _predictions(network, loader, target)
    if dims == 2:
        first = next(iter(loader))[0][:1].to(next(network.parameters()).device)
        for name, maps in _conv_outputs(network, first):
            maps = maps[0].unsqueeze(1)  # each channel a grayscale map
            columns = min(16, math.ceil(math.sqrt(maps.shape[0] * 2)))
            out[f"pictures/feature_maps_{name}.png"] = _png(_tiles(maps, columns=columns))
    if target is not None:
        out["pictures/predicted_vs_true.png"] = _predicted_png(truths, preds)
        return out
    out["pictures/confusion_matrix.png"] = _confusion_png(truths, preds, classes)
    if dims == 1:
        shown = [(x, f"{classes[p]} / {classes[t]}"[:24]) for x, p, t in wrong]
        title = "misclassified test series: predicted / true"
        out["pictures/misclassified.png"] = _curves_png(shown, title, color="#b00020")
    elif dims == 3:
        out["pictures/misclassified.png"] = _frames_png(wrong, classes)
    else:
        out["pictures/misclassified.png"] = _misclassified_png(wrong, classes)
    return out


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def log_pictures(
    network: Any, loader: Any, classes: list[str], target: tuple[float, float] | None = None
) -> float:
    """Log the pictures to the active MLflow run; seconds taken."""
    import tempfile
    import time
    from pathlib import Path

    import mlflow

    started = time.perf_counter()
    drawn = pictures(network, loader, classes, target)
    with tempfile.TemporaryDirectory() as folder:
        for path, data in drawn.items():
            target = Path(folder, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        mlflow.log_artifacts(str(Path(folder, "pictures")), artifact_path="pictures")
    return time.perf_counter() - started
