"""Pushing a model folder to the Hugging Face hub: only the files a model folder consists of, in one commit.

A folder is either timm's (``config.json`` with ``architecture`` + weights) or transformers'
(``config.json`` with ``model_type`` + weights + ``preprocessor_config.json``); a repair run folder
is a timm folder that also holds ``repair_report.json`` and ``before_after_<image>.png``. The model
card (``sinder_hub.cards``) is the folder's own ``README.md`` or generated at push time.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from safetensors import safe_open

from . import dvt
from .cards import build_model_card
from .errors import InputError, SinderError
from .runs import INCOMPLETE

CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
REPORT_FILE = "repair_report.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
REGISTERS_FILE = "test_time_registers.json"


class PushError(SinderError, RuntimeError):
    """A push that cannot be done or was refused; the message is one line and never contains the token."""


class UnpushableFolderError(PushError, InputError):
    """A folder that is not a finished, loadable model folder (exit code 2: nothing was attempted)."""


@dataclass(frozen=True)
class PushResult:
    """What a push sends (``files``: name, size in bytes), what it leaves out (``left_out``: name, reason)
    and, unless a dry run, where it went."""

    folder: Path
    repo_id: str
    files: list[tuple[str, int]]
    left_out: list[tuple[str, str]]
    card: str
    card_is_new: bool
    commit_url: str | None = None
    pr_url: str | None = None


# ---------------------------------------------------------------- push

# The files a model folder consists of, as export writes them (timm save_for_hf, transformers save_pretrained
# with its shards, the image processor, the card, a repair run's report and pictures), plus pickled weights of
# folders saved without safetensors. push uploads these and nothing else; sub-folders (a run's checkpoint/) stay local.
MODEL_FILES = (
    CONFIG_FILE,
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    "preprocessor_config.json",
    CARD_FILE,
    REPORT_FILE,
    "before_after_*.png",
)


@dataclass(frozen=True)
class UploadPlan:
    """What a push sends (``files``: name in the repo -> real path inside the folder) and what it leaves out
    (``left_out``: name, reason; a sub-folder's name ends with ``/``)."""

    files: dict[str, Path]
    left_out: list[tuple[str, str]]


def plan_upload(folder: str | Path) -> UploadPlan:
    """The top-level model files of ``folder`` (``MODEL_FILES``) and, with the reason, every entry left out.

    A symlink is uploaded as the file it points to when that file is inside the folder, and left out
    otherwise; pickled weights beside ``.safetensors`` ones are left out (loaders read the latter). Raises
    ``UnpushableFolderError`` when ``folder`` is not a finished model folder: not a folder, a run marked
    ``INCOMPLETE``, no config or weights left to upload, or a ``.safetensors`` file that does not open.
    """
    if dvt.source_refusal(str(folder)):  # a DVT denoiser is no model folder of any stock loader
        raise UnpushableFolderError(dvt.source_refusal(str(folder)))
    folder = Path(folder)
    if not folder.is_dir():
        raise UnpushableFolderError(f"{folder} is not a folder")
    if (folder / INCOMPLETE).exists():
        raise UnpushableFolderError(f"this run is incomplete: {folder} (finish it with --resume or start again)")
    root = folder.resolve()
    files, left_out = {}, []
    for entry in sorted(folder.iterdir()):
        reason = _left_out_because(entry, root)
        if reason is None:
            files[entry.name] = entry.resolve()
        else:
            left_out.append((entry.name + "/" if reason == "sub-folder" else entry.name, reason))
    if any(name.endswith(".safetensors") for name in files):
        for name in [name for name in files if name.startswith("pytorch_model")]:
            del files[name]
            left_out.append((name, "duplicate weights: the .safetensors ones are uploaded"))
    plan = UploadPlan(files, sorted(left_out))
    _check_plan(folder, plan)
    return plan


def _left_out_because(entry: Path, root: Path) -> str | None:
    """Why push leaves the folder entry ``entry`` out, or ``None`` when it uploads it."""
    if entry.is_symlink():
        try:
            target = entry.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return "broken symlink"
        if not target.is_relative_to(root):
            return "symlink out of the folder"
    if entry.is_dir():
        return "sub-folder"
    if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in MODEL_FILES):
        return "not a model file"
    if not entry.is_file():
        return "broken symlink" if entry.is_symlink() else "not a regular file"
    return None


def _check_plan(folder: Path, plan: UploadPlan) -> None:
    """Refuse a plan without config or weights (naming what was left out and why) or with unloadable safetensors."""
    left_out = {name.rstrip("/"): reason for name, reason in plan.left_out}
    if REGISTERS_FILE in left_out and CONFIG_FILE not in plan.files:
        raise UnpushableFolderError(
            f"{folder} holds test-time registers ({REGISTERS_FILE}), which are hooks on a base model, not weights: "
            "push the base model, and share the registers file beside it"
        )
    problems = []
    if CONFIG_FILE not in plan.files:
        reason = left_out.get(CONFIG_FILE)
        problems.append(f"{CONFIG_FILE} is left out ({reason})" if reason else f"it has no {CONFIG_FILE}")
    if not any(_is_weights(name) for name in plan.files):
        weights_left_out = [f"{name} is left out ({reason})" for name, reason in left_out.items() if _is_weights(name)]
        problems += weights_left_out or ["it has no weights file (model.safetensors or pytorch_model.bin)"]
    if problems:
        raise UnpushableFolderError(f"{folder} cannot be pushed: {'; '.join(problems)}")
    for name, path in plan.files.items():
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # the header is read and checked against the file size
            raise UnpushableFolderError(
                f"{folder / name} does not load, the file is truncated or corrupt "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            ) from error


def _is_weights(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WEIGHT_PATTERNS)


def _model_card(folder: Path, plan: UploadPlan, repo_id: str) -> tuple[str, bool]:
    """The folder's own README.md if it is uploaded, else a card generated for ``repo_id`` (and ``True``).

    The card is built from a temporary folder of links to the uploaded files only, so that a file left out
    (a report or picture symlinked from elsewhere) never shows in it; nothing is written into ``folder``.
    """
    if CARD_FILE in plan.files:
        return plan.files[CARD_FILE].read_text(encoding="utf-8", errors="replace"), False
    with tempfile.TemporaryDirectory(prefix="sinder-card-") as tmp:
        view = Path(tmp) / folder.resolve().name
        view.mkdir()
        for name, path in plan.files.items():
            os.symlink(path, view / name)
        try:
            return str(build_model_card(view, repo_id=repo_id)), True
        except InputError as error:  # an invalid JSON file, named by its place in the folder
            raise UnpushableFolderError(str(error).replace(str(view), str(folder))) from error


def _commit_operations(folder: Path, plan: UploadPlan, card: str, card_is_new: bool) -> list[CommitOperationAdd]:
    """One addition per uploaded file, read from its real path, and the generated card from memory."""
    operations = []
    for name, path in plan.files.items():
        try:
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
        except (OSError, ValueError) as error:  # unreadable, or gone since the folder was listed
            reason = error.strerror if isinstance(error, OSError) else "no longer a file"
            raise UnpushableFolderError(f"cannot read {folder / name}: {reason} (nothing was uploaded)") from error
    if card_is_new:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
    return operations


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload the model files of a folder (``plan_upload``) to the model repo ``repo_id`` (created if needed).

    One commit holds exactly the listed files and README.md: the folder's own, else the model card (kind from
    ``config.json``, figures from ``repair_report.json``) sent from memory. The folder is never written to.
    ``dry_run`` only says what would be sent and what is left out: no token, no network. Failures (no token,
    hub unreachable, upload refused) raise ``PushError``. ``token`` defaults to huggingface_hub's
    ``get_token()`` (``HF_TOKEN``, then the ``hf auth login`` file).
    """
    folder = Path(folder)
    plan = plan_upload(folder)
    card, card_is_new = _model_card(folder, plan, repo_id)
    size_of = {name: path.stat().st_size for name, path in plan.files.items()}
    if card_is_new:
        size_of[CARD_FILE] = len(card.encode())
    sizes = sorted(size_of.items())
    result = PushResult(folder, repo_id, sizes, plan.left_out, card, card_is_new)
    if dry_run:
        return result

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)")
    operations = _commit_operations(folder, plan, card, card_is_new)
    api = HfApi(token=token)
    with _explained(f"creating {repo_id} on {api.endpoint}", token):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        with _explained(f"creating branch {revision!r} of {repo_id}", token):
            _ensure_branch(api, repo_id, revision)
    with _explained(f"uploading {folder} to {repo_id}", token):
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {folder.name} with sinder-hub",
            revision=revision,
            create_pr=create_pr,
        )
    return PushResult(folder, repo_id, sizes, plan.left_out, card, card_is_new, commit.commit_url, commit.pr_url)


def _ensure_branch(api: HfApi, repo_id: str, branch: str) -> None:
    """Create ``branch`` unless it exists (as ``hf upload --revision`` does)."""
    try:
        api.repo_info(repo_id, revision=branch)
    except RevisionNotFoundError:
        api.create_branch(repo_id, branch=branch, exist_ok=True)


@contextmanager
def _explained(action: str, token: str) -> Iterator[None]:
    """Turn the hub client's HTTP, connection and request errors into a one-line ``PushError``."""
    try:
        yield
    except Exception as exc:
        reason = _reason(exc)
        if reason is None:
            raise
        message = " ".join(f"{action} failed: {reason} (the local folder is unchanged)".split())
        raise PushError(message.replace(token, "***")) from exc


def _reason(exc: BaseException) -> str | None:
    """Why a hub call failed, looking through wrapped exceptions; ``None`` for errors that are bugs."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for error in chain:
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            detail = error.server_message or str(error).splitlines()[0]
            return f"the hub answered HTTP {error.response.status_code}: {detail}"
    for error in chain:
        if isinstance(error, _connection_errors()):
            return f"could not reach the hub ({type(error).__name__}: {error})"
    if isinstance(chain[0], ValueError):
        return str(chain[0])
    return None


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Transport-level errors of whichever HTTP client this huggingface_hub uses (requests, httpx or httpx2)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            client = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(client, name) for name in names if hasattr(client, name)]
    return tuple(errors)
