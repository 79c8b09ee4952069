"""The paper's pictures as PNG files: token norms + PCA (Fig. 1) and per-block angle violins (Fig. 2d)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

from .data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

MODEL_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:cyan")  # red marks defects


def _display_image(image: Image.Image | torch.Tensor, grid_hw: tuple[int, int]) -> np.ndarray:
    """``[h, w, 3]`` in ``[0, 1]``: a normalised ``[3, h, w]`` tensor undone, or a PIL image centre-cropped to the grid's aspect."""
    if isinstance(image, torch.Tensor):
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        return (image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    width, height = image.size
    aspect = grid_hw[1] / grid_hw[0]
    crop_w, crop_h = min(width, round(height * aspect)), min(height, round(width / aspect))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return np.asarray(image.convert("RGB").crop((left, top, left + crop_w, top + crop_h))) / 255.0


def token_norms(grid: torch.Tensor) -> np.ndarray:
    """L2 norm of every token of an ``[H, W, D]`` grid: ``[H, W]``."""
    return grid.float().norm(dim=-1).cpu().numpy()


def pca_rgb(grid: torch.Tensor) -> np.ndarray:
    """First three principal components of the ``[H, W, D]`` grid's tokens, each min-max scaled to ``[0, 1]``: ``[H, W, 3]``.

    The basis is fitted on this grid alone; each component's sign is chosen so that its
    largest-magnitude projection is positive.
    """
    H, W, D = grid.shape
    x = grid.reshape(H * W, D).double().cpu()
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    components = x @ vh[:3].T
    components = components * torch.sign(components.gather(0, components.abs().argmax(dim=0, keepdim=True)))
    low, high = components.min(dim=0).values, components.max(dim=0).values
    scaled = (components - low) / (high - low).clamp_min(1e-12)
    rgb = torch.zeros(H * W, 3, dtype=torch.float64)
    rgb[:, : scaled.shape[1]] = scaled
    return rgb.reshape(H, W, 3).numpy()


def norm_pca_figure(
    images: dict[str, Image.Image | torch.Tensor],
    grids: dict[str, dict[str, torch.Tensor]],
    path: str | Path,
) -> Path:
    """Fig. 1: one row per image: the image, then per model its token-norm map and its PCA.

    ``images``: ``{name: PIL image or normalised [3, h, w] tensor}`` (the row order);
    ``grids``: ``{model label: {name: [H, W, D] tokens}}``, e.g. ``{"original": …,
    "repaired": …}`` from ``diagnostics.last_block_grids``. The norm maps of one row share
    one colour scale, so models compare at a glance; PCA is fitted per model per image.
    Writes a PNG to ``path`` and returns it.
    """
    labels = list(grids)
    missing = [(label, name) for label in labels for name in images if name not in grids[label]]
    if missing:
        raise ValueError(f"no token grid for (model, image) {missing}")
    columns = 1 + 2 * len(labels)
    fig, axes = plt.subplots(len(images), columns, figsize=(2.4 * columns, 2.3 * len(images)), squeeze=False)
    for row, (name, image) in enumerate(images.items()):
        norms = {label: token_norms(grids[label][name]) for label in labels}
        vmax = max(float(n.max()) for n in norms.values())
        axes[row, 0].imshow(_display_image(image, norms[labels[0]].shape))
        axes[row, 0].set_ylabel(name)
        for index, label in enumerate(labels):
            norm_ax, pca_ax = axes[row, 1 + 2 * index], axes[row, 2 + 2 * index]
            shown = norm_ax.imshow(norms[label], cmap="viridis", vmin=0, vmax=vmax)
            fig.colorbar(shown, ax=norm_ax, fraction=0.046, pad=0.03)
            norm_ax.set_xlabel(f"max {norms[label].max():.0f}, median {np.median(norms[label]):.0f}", fontsize=8)
            pca_ax.imshow(pca_rgb(grids[label][name]))
            if row == 0:
                norm_ax.set_title(f"{label}: token norm", fontsize=9)
                pca_ax.set_title(f"{label}: PCA", fontsize=9)
        if row == 0:
            axes[row, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def _block_angles(block: dict, grids: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """All tokens' angles and the defective ones' angles of one ``defect_report`` block, pooled over images.

    ``grids`` (``{name: [H, W]}``) turns row-major defect positions into indices; square grids need none.
    """
    all_angles, defect_angles = [], []
    for name, angles in block["token_angles"].items():
        angles = np.asarray(angles, dtype=float)
        all_angles.append(angles)
        width = grids[name][1] if name in grids else math.isqrt(len(angles))
        positions = block.get("defect_positions", {}).get(name, [])
        defect_angles.append(angles[[row * width + col for row, col in positions]])
    return np.concatenate(all_angles), np.concatenate(defect_angles)


def angle_violin_figure(
    report: dict,
    path: str | Path,
    compare: dict | list[dict] | None = None,
    labels: tuple[str, ...] | list[str] = ("original", "repaired"),
    title: str | None = None,
) -> Path:
    """Fig. 2d: per block, all tokens' acute angles to the singular defect direction (violins,
    defective tokens as dots) and the angle between singular and empirical defect directions (line).

    ``report`` (and ``compare``, one report or up to five, drawn beside it in other colours) is a
    ``diagnostics.defect_report`` dict, or any ``{"blocks": [{"token_angles": {name: [H*W]},
    "angle_singular_empirical": float | None, "defect_positions"?: {name: [[r, c], …]}}, …]}``.
    Writes a PNG to ``path`` and returns it.
    """
    others = [] if compare is None else [compare] if isinstance(compare, dict) else list(compare)
    reports = [report, *others]
    width = 0.8 / len(reports)
    depth = max(len(r["blocks"]) for r in reports)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * depth + 2) + 3.2, 4.2))
    handles = []
    for index, (rep, label) in enumerate(zip(reports, labels)):
        colour = MODEL_COLOURS[index]
        prefix = f"{label}: " if others else ""
        positions = np.arange(len(rep["blocks"])) + (index - (len(reports) - 1) / 2) * width
        pooled = [_block_angles(block, rep.get("grid", {})) for block in rep["blocks"]]
        violins = ax.violinplot(
            [angles for angles, _ in pooled], positions=positions, widths=width * 0.95, showextrema=False
        )
        for body in violins["bodies"]:
            body.set_facecolor(colour)
            body.set_alpha(0.35)
        handles.append(Patch(facecolor=colour, alpha=0.35, label=f"{prefix}all patch tokens"))
        defects_x = np.concatenate([np.full(len(defects), x) for x, (_, defects) in zip(positions, pooled)])
        defects_y = np.concatenate([defects for _, defects in pooled])
        if len(defects_y):
            ax.scatter(defects_x, defects_y, s=10, color=colour, edgecolors="tab:red", linewidths=0.8, zorder=3)
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="o",
                    linestyle="",
                    color=colour,
                    markeredgecolor="tab:red",
                    label=f"{prefix}defective tokens",
                )
            )
        line = [
            np.nan if b["angle_singular_empirical"] is None else b["angle_singular_empirical"] for b in rep["blocks"]
        ]
        (plotted,) = ax.plot(
            positions,
            line,
            "o-",
            color=colour,
            markersize=3,
            label=f"{prefix}empirical defect direction\n(mean of defective tokens)",
        )
        handles.append(plotted)
    ax.set_xticks(np.arange(depth))
    ax.set_xlabel("block")
    ax.set_ylabel("acute angle to the singular defect direction (°)")
    ax.set_ylim(0, 90)
    ax.set_xlim(-0.6, depth - 0.4)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Angles to the singular defect direction (paper Fig. 2d)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def variants_figure(rows: dict[str, dict], path: str | Path) -> Path:
    """Variants side by side: defects per image at every block (lines), and at the last block the
    defect/normal norm ratio and the cosines to the first variant (bars).

    ``rows``: ``{label: {"defects_per_block": [..], "norm_ratio", "normal_token_cosine", "class_token_cosine"}}``
    (``commands.diagnose.comparison_row``). Writes a PNG to ``path`` and returns it.
    """
    labels = list(rows)
    fig, (blocks_ax, ratio_ax, cosine_ax) = plt.subplots(1, 3, figsize=(13.5, 3.6), width_ratios=(2.2, 1, 1.2))
    for index, label in enumerate(labels):
        per_block = rows[label]["defects_per_block"]
        blocks_ax.plot(range(len(per_block)), per_block, "o-", color=MODEL_COLOURS[index], markersize=3, label=label)
    blocks_ax.set_xlabel("block")
    blocks_ax.set_title("defective tokens per image", fontsize=9)
    blocks_ax.legend(fontsize=8)
    x = np.arange(len(labels))
    ratios = [rows[label]["norm_ratio"] or 0.0 for label in labels]
    ratio_ax.bar(x, ratios, color=MODEL_COLOURS[: len(labels)])
    ratio_ax.set_title("norm of defects / normal tokens, last block", fontsize=9)
    width = 0.38
    for offset, key, hatch in ((-width / 2, "normal_token_cosine", ""), (width / 2, "class_token_cosine", "//")):
        values = [rows[label][key] if rows[label][key] is not None else np.nan for label in labels]
        cosine_ax.bar(x + offset, values, width, color=MODEL_COLOURS[: len(labels)], hatch=hatch, edgecolor="white",
                      label=key.replace("_", " ").replace(" cosine", ""))  # fmt: skip
    cosine_ax.set_ylim(min(0.9, np.nanmin([rows[label]["normal_token_cosine"] or 1 for label in labels]) - 0.01), 1.0)
    cosine_ax.set_title(f"cosine of the final features to {labels[0]}", fontsize=9)
    cosine_ax.legend(fontsize=7, loc="lower left")
    for ax in (ratio_ax, cosine_ax):
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)  # six labels stay apart
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
