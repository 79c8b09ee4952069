"""The browser viewer (``sinder-hub view``): one image through one to six backbones, side by side.

Per model: the token-norm map of one block with its defective tokens outlined, the
3-component PCA of its patch tokens (paper Fig. 1), and per block the defect count and the
angle between the singular and the empirical defect direction (Fig. 2d); the figures as a
table. Models and their singular defect directions are loaded once per process
(``load_model``, before the first request); an image then costs two forwards per model and
the pictures.

The page may face strangers (``--host 0.0.0.0``, ``--share``): the viewer reads only files
inside gradio's upload folder and its own sample PNGs (``readable_upload``), answers every
other path with one fixed message (``NOT_AN_UPLOAD``), sends no analytics and loads no
web fonts.

Gradio is imported here only: ``import sinder_hub`` never loads it.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from gradio.utils import get_upload_folder
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .analysis import singular_defect_directions
from .backbones import load_backbone, native_resolution
from .data import MAX_PIXELS, SAMPLE_IMAGE_NAMES, load_rgb, sample_images, sinder_transform
from .diagnostics import defect_report
from .errors import DataError, InputError
from .planted import CALIBRATION_RESOLUTION
from .plots import MODEL_COLOURS, pca_rgb, token_norms
from .tokens import block_outputs, patch_grid
from .variants import MAX_VARIANTS, parse_variants

log = logging.getLogger(__name__)

DEMO_RUN = Path("demo-output") / "run"
OUTLINE = (255, 0, 0)
COLUMNS_PER_ROW = 3  # model columns beside the input; with more models, rows of three below it (six stay legible)
METHOD_NOTES = {
    "expected": "`expected` (the noise-free limit of the authors' least squares; 0.9 s per planted model "
    "on 2 CPU cores vs 28 s for `sampled` with 100k samples)",
    "sampled": "`sampled` (the authors' least squares on 100k samples, seed 0)",
}
# the one answer to any path that is not a readable file the viewer may read: nothing to tell apart
NOT_AN_UPLOAD = (
    "**Error:** the viewer reads only images uploaded to this page and its own samples; "
    "upload or paste an image, or pick a sample."
)
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "monospace")


def default_models() -> list[str]:
    """``planted-swiglu``, and beside it the demo's repaired run when ``demo-output/run`` exists (cwd-relative)."""
    return ["planted-swiglu", *([str(DEMO_RUN)] if DEMO_RUN.is_dir() else [])]


@dataclass(frozen=True)
class LoadedModel:
    """A backbone in eval mode, its singular defect ``directions`` ``[depth, D]`` and what loading took."""

    spec: str
    model: torch.nn.Module
    directions: torch.Tensor
    resolution: int
    load_seconds: float
    directions_seconds: float

    @property
    def patch(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def depth(self) -> int:
        return len(self.model.blocks)


def load_model(spec: str, method: str = "expected") -> LoadedModel:
    """``load_backbone(spec)`` and ``singular_defect_directions(model, method=method)`` (seed 0), once per process."""
    return _load_model(spec, method)  # one cache entry per (spec, method), however the call spells them


@functools.lru_cache(maxsize=8)
def _load_model(spec: str, method: str) -> LoadedModel:
    started = time.perf_counter()
    model = load_backbone(spec)
    loaded = time.perf_counter()
    directions = singular_defect_directions(model, generator=torch.Generator().manual_seed(0), method=method)
    return LoadedModel(
        spec, model, directions, native_resolution(spec, model), loaded - started, time.perf_counter() - loaded
    )


@dataclass
class ModelView:
    """One model's answer for one image: its ``defect_report``, the ``[H, W, D]`` grid of the shown block and pictures."""

    label: str
    spec: str
    report: dict
    grid: torch.Tensor
    defects: list[list[int]]
    norm_picture: np.ndarray | None = None
    pca_picture: np.ndarray | None = None


@dataclass
class Answer:
    """Everything the page shows for one request; ``views`` is empty when ``message`` is an error."""

    message: str
    views: dict[str, ModelView]
    block: int = 0
    vmax: float = 0.0
    chart: np.ndarray | None = None
    table: str = ""


def upscale(picture: np.ndarray, patch: int) -> np.ndarray:
    """``[H, W, C]`` per-token colours -> ``[H * patch, W * patch, C]`` pixels, one square per token."""
    return picture.repeat(patch, axis=0).repeat(patch, axis=1)


def norm_picture(grid: torch.Tensor, defects: list[list[int]], patch: int, vmax: float) -> np.ndarray:
    """Token norms of an ``[H, W, D]`` grid in viridis on ``[0, vmax]``, defective tokens outlined in red: ``[H*p, W*p, 3]`` uint8."""
    colours = matplotlib.colormaps["viridis"](token_norms(grid) / max(vmax, 1e-12))[..., :3]
    picture = upscale((colours * 255).round().astype(np.uint8), patch)
    width = max(1, patch // 7)
    for row, col in defects:
        top, left = row * patch, col * patch
        cell = picture[top : top + patch, left : left + patch]
        cell[:width], cell[-width:], cell[:, :width], cell[:, -width:] = OUTLINE, OUTLINE, OUTLINE, OUTLINE
    return picture


def block_chart(views: dict[str, ModelView], block: int, method: str) -> np.ndarray:
    """Per block, defects of the image and the singular-vs-empirical angle (Fig. 2d), per model: ``[h, w, 3]`` uint8."""
    figure = Figure(figsize=(9.0, 2.8), dpi=100)
    counts_ax, angle_ax = figure.subplots(1, 2)
    width = 0.8 / len(views)
    for index, view in enumerate(views.values()):
        blocks = view.report["blocks"]
        x = np.arange(len(blocks)) + (index - (len(views) - 1) / 2) * width
        colour = MODEL_COLOURS[index]
        counts_ax.bar(x, [b["defects_per_image"] for b in blocks], width, color=colour, label=view.label)
        angles = [np.nan if b["angle_singular_empirical"] is None else b["angle_singular_empirical"] for b in blocks]
        angle_ax.plot(np.arange(len(blocks)), angles, "o-", color=colour, markersize=3, label=view.label)
    depth = max(len(view.report["blocks"]) for view in views.values())
    for ax, title in ((counts_ax, "defective tokens"), (angle_ax, "angle singular vs empirical direction (°)")):
        ax.axvline(block, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(depth))
        ax.set_xlabel("block (dashed: shown)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    angle_ax.set_ylim(0, 90)
    figure.suptitle(f"per block; singular directions: {method} method", fontsize=9)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def numbers_table(views: dict[str, ModelView], block: int) -> str:
    """Markdown table: per model, defects at ``block`` and per block, mean norms, cosine to the first model's tokens."""
    reference = next(iter(views.values()))
    normal = torch.ones(reference.grid.shape[:2], dtype=torch.bool)
    for row, col in reference.defects:
        normal[row, col] = False
    lines = [
        f"| model | defects at block {block} | defects per block | mean norm, defects | mean norm, normal | "
        f"cos to {reference.label} (its normal tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for view in views.values():
        stats = view.report["blocks"][block]
        cosine = F.cosine_similarity(view.grid.double(), reference.grid.double(), dim=-1)[normal].mean()
        per_block = " ".join(str(b["defects_per_image"]).removesuffix(".0") for b in view.report["blocks"])
        lines.append(
            f"| {view.label}: `{view.spec}` | {len(view.defects)} | {per_block} | {_cell(stats['norm_defective'])} | "
            f"{_cell(stats['norm_normal'])} | {float(cosine):.5f} |"
        )
    return "\n".join(lines)


def readable_upload(path: str | Path, folders: Sequence[Path]) -> Path | None:
    """``path`` with symlinks and ``..`` resolved when that is a readable regular file inside one of the
    (resolved) ``folders``; else ``None``, whatever the reason (missing, a folder, elsewhere, unreadable)."""
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
        return None
    if not any(resolved.is_relative_to(folder) for folder in folders):
        return None
    if not resolved.is_file() or not os.access(resolved, os.R_OK):
        return None
    return resolved


class Viewer:
    """The models of one app and the answer to one request (no gradio here: tests call it directly).

    ``specs``: one to six backbone specs, each optionally ``LABEL=SPEC`` (``sinder_hub.variants``:
    the first is ``original`` unless labelled). A spec that fails to load, or whose patch size
    or depth differs from the first loaded one, is kept in ``failures`` ``{label: message}`` and
    shown on the page instead of its pictures. ``answer`` reads only files inside
    ``upload_folders`` (the app passes gradio's upload folder) and the viewer's own samples.
    """

    def __init__(
        self,
        specs: Sequence[str],
        method: str = "expected",
        max_pixels: int = MAX_PIXELS,
        resolution: int | None = None,
        upload_folders: Sequence[str | Path] = (),
    ):
        if not 1 <= len(specs) <= MAX_VARIANTS:
            raise InputError(f"the viewer shows one to {MAX_VARIANTS} models side by side, got {len(specs)}")
        self.specs = {variant.label: variant.spec for variant in parse_variants(specs[0], specs[1:], flag="specs")}
        self.method, self.max_pixels = method, max_pixels
        self.models: dict[str, LoadedModel] = {}
        self.failures: dict[str, str] = {}
        for label, spec in self.specs.items():
            self._load(label, spec)
        first = next(iter(self.models.values()), None)
        self.patch = first.patch if first else 14
        self.depth = first.depth if first else 1
        self.resolution = resolution or (first.resolution if first else CALIBRATION_RESOLUTION)
        if self.resolution % self.patch:
            raise InputError(f"resolution {self.resolution} is not a multiple of the patch size {self.patch}")
        self.max_resolution = max(self.resolution * 2, 518) // self.patch * self.patch
        self._samples_folder = tempfile.TemporaryDirectory(prefix="sinder-hub-samples-")  # removed with the viewer
        self._samples = Path(self._samples_folder.name).resolve()
        self.readable_folders = (*(Path(folder).resolve() for folder in upload_folders), self._samples)

    def _load(self, label: str, spec: str) -> None:
        """Load ``spec`` into ``models``, or record why it cannot be shown in ``failures``."""
        try:
            loaded = load_model(spec, self.method)
        except Exception as error:  # noqa: BLE001 - any failure is shown on the page, the others still serve
            self.failures[label] = f"`{spec}` could not be loaded: {error}"
            log.warning("viewer: %s could not be loaded: %s", spec, error)
            return
        first = next(iter(self.models.values()), loaded)
        if (loaded.patch, loaded.depth) != (first.patch, first.depth):
            self.failures[label] = (
                f"`{spec}` has patch {loaded.patch} and {loaded.depth} blocks, `{first.spec}` "
                f"patch {first.patch} and {first.depth} blocks: they cannot be shown side by side"
            )
            return
        self.models[label] = loaded

    def sample_path(self, name: str | None) -> str | None:
        """A ``skimage.data`` sample written once as ``<name>.png``, for the image input; ``None`` for other names."""
        if name not in SAMPLE_IMAGE_NAMES:
            return None
        path = self._samples / f"{name}.png"
        if not path.exists():
            sample_images([name])[name].save(path)
        return str(path)

    def read_image(self, path: Path) -> Image.Image:
        """The uploaded file as RGB; ``InputError`` for an empty, undecodable, tiny or too large file."""
        if path.stat().st_size == 0:
            raise InputError(f"{path.name} is empty (0 bytes)")
        try:
            return load_rgb(path, min_size=self.patch, max_pixels=self.max_pixels)
        except DataError as error:  # the message starts with the full path, a temporary file's here
            raise InputError(str(error).replace(str(path), path.name)) from error

    @torch.inference_mode()
    def answer(self, path: str | Path | None, resolution: int | None = None, block: int | None = None) -> Answer:
        """Pictures and figures of the image at ``path`` for every loaded model; errors come back as ``message``."""
        started = time.perf_counter()
        if not self.models:
            return Answer("No model could be loaded: " + "; ".join(self.failures.values()), {})
        if path is None:
            return Answer("Upload or paste an image, or pick a sample.", {})
        upload = readable_upload(path, self.readable_folders)
        if upload is None:
            return Answer(NOT_AN_UPLOAD, {})
        try:
            image = self.read_image(upload)
        except InputError as error:
            return Answer(f"**Error:** {error}", {})
        resolution = min(
            max(self.patch, round((resolution or self.resolution) / self.patch) * self.patch), self.max_resolution
        )
        block = min(max(int(self.depth - 1 if block is None else block), 0), self.depth - 1)
        views = self._views(image, upload.stem, resolution, block)
        vmax = max(float(token_norms(view.grid).max()) for view in views.values())
        for view in views.values():
            view.norm_picture = norm_picture(view.grid, view.defects, self.patch, vmax)
            view.pca_picture = upscale((pca_rgb(view.grid) * 255).round().astype(np.uint8), self.patch)
        chart, table = block_chart(views, block, self.method), numbers_table(views, block)
        grid_h, grid_w = next(iter(views.values())).grid.shape[:2]
        message = (
            f"`{upload.name.replace('`', '')}`: {image.width}×{image.height} px, centre crop at {resolution} px "
            f"({grid_h}×{grid_w} tokens), block {block}; answered in {time.perf_counter() - started:.2f} s"
        )
        return Answer(message, views, block, vmax, chart, table)

    def _views(self, image: Image.Image, name: str, resolution: int, block: int) -> dict[str, ModelView]:
        """Every loaded model's ``defect_report`` and ``block``'s token grid for ``image`` at ``resolution``."""
        views = {}
        for label, loaded in self.models.items():
            tensor = sinder_transform(resolution, loaded.model)(image)
            report = defect_report(loaded.model, {name: tensor}, loaded.directions)
            tokens = block_outputs(loaded.model, tensor[None])[block][0]
            grid = patch_grid(loaded.model, tokens, (resolution, resolution)).float()
            views[label] = ModelView(
                label, loaded.spec, report, grid, report["blocks"][block]["defect_positions"][name]
            )
        return views


def uploaded_path(payload) -> str | None:
    """Preprocessing of the image input: the payload's path, unopened and unchecked (``Viewer.answer`` reads
    it only inside gradio's upload folder; ``gr.Image`` would decode any path it is sent, and a bad
    upload would end in gradio's generic error instead of the viewer's message)."""
    return None if payload is None else payload.path


def header(viewer: Viewer) -> str:
    """The page's introduction: which models, their load times, the direction method."""
    lines = [
        "# sinder-hub viewer: singular defects, side by side",
        f"Singular defect directions: {METHOD_NOTES[viewer.method]}. Defective tokens (eq. 5, 4σ) are "
        "outlined in red on the token-norm maps; all maps share one colour scale. The table's cosine is "
        "to the first model's tokens.",
    ]
    for label, loaded in viewer.models.items():
        lines.append(
            f"- **{label}**: `{loaded.spec}` (loaded in {loaded.load_seconds:.1f} s, directions in "
            f"{loaded.directions_seconds:.1f} s, native resolution {loaded.resolution} px)"
        )
    lines += [f"- **{label}**: **Error:** {message}" for label, message in viewer.failures.items()]
    return "\n".join(lines)


def system_font_theme() -> gr.themes.Base:
    """Gradio's default theme on the browser's own fonts: the page fetches no font from anywhere."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)


def input_column(viewer: Viewer) -> tuple[gr.Image, gr.Dropdown, gr.Slider, gr.Slider]:
    """The image input, the sample picker and the resolution and block sliders."""
    with gr.Column(scale=1, min_width=240):
        image = gr.Image(
            label="image: upload or paste",
            type="filepath",
            sources=["upload", "clipboard"],
            elem_id="input-image",
            height=260,
        )
        image.preprocess = uploaded_path  # not a subclass: gradio writes a .pyi beside any Component subclass
        sample = gr.Dropdown(
            choices=list(SAMPLE_IMAGE_NAMES), value=None, label="or a skimage.data sample", elem_id="sample"
        )
        size = gr.Slider(
            4 * viewer.patch,
            viewer.max_resolution,
            value=viewer.resolution,
            step=viewer.patch,
            label=f"resolution (px, multiple of the patch, {viewer.patch})",
            elem_id="resolution",
        )
        block = gr.Slider(
            0, viewer.depth - 1, value=viewer.depth - 1, step=1, label="block (0 = first)", elem_id="block"
        )
    return image, sample, size, block


def model_columns(viewer: Viewer, first: int = 0, count: int | None = None) -> list[gr.Image]:
    """One column per spec (``count`` of them from the ``first``): its title (and why it is missing, if it is),
    its token-norm map and its PCA."""
    pictures = []
    for index, (label, spec) in list(enumerate(viewer.specs.items()))[first : None if count is None else first + count]:
        with gr.Column(scale=1, min_width=220):
            failure = viewer.failures.get(label)
            gr.Markdown(
                f"### {label}: `{spec}`" + (f"\n\n**Error:** {failure}" if failure else ""), elem_id=f"column-{index}"
            )
            pictures.append(gr.Image(label="token norm", format="png", interactive=False, elem_id=f"norm-{index}"))
            pictures.append(
                gr.Image(label="PCA of the patch tokens", format="png", interactive=False, elem_id=f"pca-{index}")
            )
    return pictures


def page_updates(viewer: Viewer, answer: Answer) -> list:
    """The outputs of one answer: message, table, chart, then the two pictures of every column."""
    updates = [answer.message, answer.table, answer.chart]
    for label in viewer.specs:
        view = answer.views.get(label)
        if view is None:
            updates += [gr.update(value=None, label="token norm"), gr.update(value=None)]
            continue
        norm_label = f"token norm at block {answer.block} (0 – {answer.vmax:.0f}, shared scale; red: defects)"
        updates += [gr.update(value=view.norm_picture, label=norm_label), gr.update(value=view.pca_picture)]
    return updates


def build_app(
    models: Sequence[str] | None = None,
    resolution: int | None = None,
    method: str = "expected",
    max_pixels: int = MAX_PIXELS,
) -> gr.Blocks:
    """A Gradio Blocks app showing ``models`` (one to six specs, ``LABEL=SPEC`` allowed; default
    ``default_models()``) side by side.

    Loads the models and their directions now. ``resolution``: the default input size (a
    multiple of the patch; default the first model's native one); ``max_pixels``: larger
    uploads are refused. Analytics are off (also ``GRADIO_ANALYTICS_ENABLED`` for this process),
    and ``app.launch(server_name=..., server_port=...)`` serves the page on system fonts.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    viewer = Viewer(list(models or default_models()), method, max_pixels, resolution, [get_upload_folder()])
    with gr.Blocks(title="sinder-hub viewer", analytics_enabled=False) as app:
        gr.Markdown(header(viewer), elem_id="header")
        beside = len(viewer.specs) <= COLUMNS_PER_ROW  # more models: rows of COLUMNS_PER_ROW below the input
        with gr.Row():
            image, sample, size, block = input_column(viewer)
            pictures = model_columns(viewer) if beside else []
        for first in range(0, 0 if beside else len(viewer.specs), COLUMNS_PER_ROW):
            with gr.Row():
                pictures += model_columns(viewer, first, COLUMNS_PER_ROW)
        message = gr.Markdown(elem_id="message")
        table = gr.Markdown(elem_id="numbers")
        chart = gr.Image(label="per block", format="png", interactive=False, elem_id="chart")

        def respond(path, resolution, shown_block):
            return page_updates(viewer, viewer.answer(path, resolution, shown_block))

        sample.change(viewer.sample_path, inputs=sample, outputs=image, api_name="sample")
        gr.on(
            [image.change, size.change, block.change],
            respond,
            inputs=[image, size, block],
            outputs=[message, table, chart, *pictures],
            trigger_mode="always_last",
            api_name="respond",
        )
    app.launch = functools.partial(app.launch, theme=system_font_theme())
    return app
