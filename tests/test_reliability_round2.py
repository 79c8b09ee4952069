"""Reliability, round 2 (issue 17): diagnose never overwrites an earlier output, data sources follow one
rule, weights offline fail fast in one line, and the command line answers --version."""

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from sinder_hub import downloads, load_backbone
from sinder_hub.cli import main as cli
from sinder_hub.data import list_images
from sinder_hub.errors import BackboneError, DataError
from sinder_hub.runs import RunFolder


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def image(path: Path, kind: str = "PNG") -> Path:
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path, format=kind)
    return path


# --- diagnose --out ---------------------------------------------------------------------------------


def test_diagnose_refuses_an_earlier_output_before_any_model(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("mine")
    assert cli(["diagnose", "--model", "planted-gelu", "--out", str(out)]) == 2
    line = one_line(capsys)
    assert f"--out {out} already holds report.json" in line and "--overwrite" in line
    assert json.loads((out / "report.json").read_text()) == {"mine": True}


def test_diagnose_on_a_read_only_out_is_one_line_before_any_model(tmp_path, capsys, no_model):
    from test_run_safety import read_only_folder

    with read_only_folder(tmp_path / "ro") as folder:
        assert cli(["diagnose", "--model", "planted-gelu", "--out", str(folder / "out")]) == 1
        line = one_line(capsys)
        assert f"cannot write into --out {folder / 'out'}: Read-only file system" in line


# --- data sources -------------------------------------------------------------------------------------


def test_a_symlinked_sub_folder_is_followed_once(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    image(data / "a.png")
    image(elsewhere / "b.png")
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(data, target_is_directory=True)  # a link back: no endless walk
    assert [p.relative_to(data).as_posix() for p in list_images(data)] == ["a.png", "linked/b.png"]


def test_folders_and_lists_take_the_same_images(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    gif, tif = image(data / "a.gif", "GIF"), image(data / "b.tif", "TIFF")
    (data / "notes.txt").write_text("not an image")
    assert list_images(data) == [gif, tif]
    listing = tmp_path / "list.txt"
    listing.write_text("\ufeffdata/a.gif\r\ndata/b.tif\n")  # a byte-order mark and CRLF
    assert list_images(listing) == [gif, tif]
    listing.write_text("data/a.gif\ndata/notes.txt\n")
    with pytest.raises(DataError, match="1 listed files are not images by their suffix .*notes.txt"):
        list_images(listing)


# --- weights ----------------------------------------------------------------------------------------------


def test_a_corrupt_safetensors_file_says_it_is_corrupt(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(BackboneError, match="truncated or corrupt"):
        load_backbone(path)


def test_weights_that_are_neither_cached_nor_reachable_fail_fast_in_one_line(monkeypatch):
    monkeypatch.setattr(downloads, "_unreachable", lambda host, port: "Name or service not known")
    monkeypatch.setattr(downloads, "_cached", lambda kind, where: False)
    started = time.perf_counter()
    for spec, repo in (("vit_small_patch14_dinov2.lvd142m", "timm/vit_small_patch14_dinov2.lvd142m"),
                       ("hf-hub:alice/dinov2-sinder", "alice/dinov2-sinder")):  # fmt: skip
        with pytest.raises(BackboneError) as raised:
            load_backbone(spec)
        message = str(raised.value)
        assert message.startswith(f"{spec}: its pretrained weights") and "\n" not in message
        assert f"hf download {repo} --local-dir DIR" in message and "Name or service not known" in message
    assert time.perf_counter() - started < 30


def test_cached_weights_load_with_the_hub_client_offline(monkeypatch):
    from huggingface_hub import constants

    seen = []
    monkeypatch.setattr(downloads, "_cached", lambda kind, where: True)
    with downloads.weights_within_reach("vit_small_patch14_dinov2.lvd142m", "spec"):
        seen.append(constants.HF_HUB_OFFLINE)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False


# --- the command line ---------------------------------------------------------------------------------------


def test_version_and_no_command(capsys):
    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sinder-hub {__import__('sinder_hub').__version__}"
    assert cli([]) == 2
    assert capsys.readouterr().err.startswith("error: sinder-hub: no command given; expected one of repair, registers")


@pytest.mark.slow
def test_a_tilde_in_an_output_path_means_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunFolder("~/runs/x").path == tmp_path / "runs" / "x"
    monkeypatch.chdir(tmp_path)
    assert cli(["export", "planted-nothing", "--to", "~/out"]) == 2
    assert not (tmp_path / "~").exists()
