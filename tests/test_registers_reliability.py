"""Reliability, round 3 (issue 24), the registers, model-spec, diagnose and command-line items: a registers folder
never shares a folder with a model or with its images, every bad input ends in one ``error:`` line before the work
(hand-edited registers files, unreadable images, specs, config.json, flags), SIGTERM and Ctrl-C end a run in one
line leaving nothing that loads, and every command's usage says ``sinder-hub <command>``."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from cli_checks import cli, error_line, one_error_line, snapshot
from PIL import Image
from test_reliability_io import small_vit
from tiny import tiny_vit

import sinder_hub.backbones
import sinder_hub.report
from sinder_hub import load_backbone
from sinder_hub.backbones import MAX_RESOLUTION, REGISTERS_FILE
from sinder_hub.cli import COMMANDS
from sinder_hub.convert import save_timm
from sinder_hub.errors import BackboneError
from sinder_hub.registers import RegisterNeuron, TestTimeRegisters
from sinder_hub.registers_folder import MAX_TOP_K


def photo(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A noisy RGB picture (``size`` px a side)."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        photo(folder / f"p{seed}.png", seed=seed)
    return folder


@pytest.fixture
def tiny_model(monkeypatch):
    """``load_backbone`` gives a tiny random ViT (56 px, 14-px patches): runs without a real model."""
    model = tiny_vit()
    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", lambda spec, **kwargs: model)
    return model


def registers_argv(images, output, *extra) -> list[str]:
    return ["registers", "--model", "planted-swiglu", "--images", str(images), "--output", str(output),
            "--held-out", "astronaut", *extra]  # fmt: skip


def registers_file(folder: Path, **changes) -> Path:
    """A valid ``test_time_registers.json`` in ``folder`` (base planted-swiglu), with ``changes`` to its JSON."""
    found = TestTimeRegisters(base_model="planted-swiglu", base_sha256=None, neurons=(RegisterNeuron(4, 1, 0.5),))
    data = {**json.loads(found.to_json()), **changes}
    folder.mkdir(exist_ok=True)
    (folder / REGISTERS_FILE).write_text(json.dumps(data))
    return folder


# --- 4: one folder, one meaning ----------------------------------------------------------------------------


def test_registers_refuses_an_output_that_holds_a_model_even_with_overwrite(photos, tmp_path, capsys, no_model):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architecture": "vit_small_patch14_dinov2"}')
    (model / "model.safetensors").write_bytes(b"weights")
    before = snapshot(model)
    code = cli(registers_argv(photos, model, "--overwrite"))
    line = one_error_line(capsys, code, 2, f"--output {model} holds a model", "config.json", "model.safetensors")
    assert "two things" in line
    assert snapshot(model) == before


def test_a_folder_that_is_both_a_model_and_registers_is_refused(tmp_path):
    folder = tmp_path / "both"
    save_timm(small_vit(), folder)
    registers_file(folder)
    with pytest.raises(BackboneError, match=f"{folder} holds both a model .config.json. and test-time registers"):
        load_backbone(folder)


# --- 5: one line where a traceback was ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["garbage", "tiny"])
def test_registers_on_images_it_cannot_read_is_one_line(bad, tmp_path, capsys, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        if bad == "garbage":
            (images / f"{index}.png").write_bytes(b"not a picture")
        else:
            photo(images / f"{index}.png", size=8)
    output = tmp_path / "out"
    code = cli(registers_argv(images, output, "--resolution", "56"))
    line = one_error_line(capsys, code, 2, f"--images {images}", "none of the 3 images drawn could be read")
    assert ("cannot read image" if bad == "garbage" else "smaller than one 14-px patch") in line
    assert not output.exists()  # the run left no trace


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"neurons": [{"layer": "4", "unit": 1, "score": 0.5}]}, 'neurons[0].layer: expected an integer, found "4"'),
        ({"neurons": [{"layer": 4.5, "unit": 1, "score": 0.5}]}, "neurons[0].layer: expected an integer, found 4.5"),
        ({"neurons": [{"layer": 4, "unit": True, "score": 0.5}]}, "neurons[0].unit: expected an integer, found true"),
        ({"base_model": None}, "base_model: expected a string, found null"),
        ({"base_sha256": 123}, "base_sha256: expected a string or null, found 123"),
        ({"base_model": ""}, "base_model: expected a model spec, found an empty string"),
        ({"neurons": {"layer": 4}}, 'neurons: expected a list, found {"layer": 4}'),
        ({"settings": {"top_k": 3}}, "settings.num_images: missing"),
        ({"colour": "red"}, "colour: not a field of a registers file"),
    ],
)
def test_a_hand_edited_registers_file_is_refused_field_by_field(changes, expected, tmp_path, monkeypatch):
    folder = registers_file(tmp_path / "ttr", **changes)
    monkeypatch.setattr(sinder_hub.backbones, "_planted", lambda *a: pytest.fail("the base model was loaded"))
    with pytest.raises(BackboneError) as raised:
        load_backbone(folder)
    assert str(raised.value) == f"{folder / REGISTERS_FILE}: {expected}"


@pytest.mark.slow
def test_a_registers_file_error_is_one_line_on_the_command_line(tmp_path, capsys):
    folder = registers_file(tmp_path / "ttr", base_sha256=123)
    code = cli(["diagnose", "--model", str(folder), "--out", str(tmp_path / "out")])
    one_error_line(capsys, code, 2, folder / REGISTERS_FILE, "base_sha256")


def test_deep_json_and_bases_that_point_at_each_other_are_one_line(tmp_path):
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / REGISTERS_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BackboneError, match="not a valid registers file .RecursionError: nested too deeply"):
        load_backbone(deep)
    first, second = tmp_path / "first", tmp_path / "second"
    registers_file(first, base_model=str(second))
    registers_file(second, base_model=str(first))
    with pytest.raises(BackboneError, match=f"its base model {second} is another test-time-registers folder"):
        load_backbone(first)
    registers_file(first, base_model=str(first))
    with pytest.raises(BackboneError, match="is the folder itself"):
        load_backbone(first)


def test_diagnose_refuses_a_resolution_above_the_bound_before_any_model(tmp_path, capsys, no_model):
    code = cli(["diagnose", "--model", "planted-gelu", "--resolution", "14000", "--out", str(tmp_path / "out")])
    one_error_line(capsys, code, 2, "--resolution 14000", f"at most {MAX_RESOLUTION} px")


@pytest.mark.parametrize("spec", ["hf-hub:alice bob/x", "hf-hub:a/b/c", "hf-hub:", "hf-hub:a/b@main@x"])
def test_an_hf_hub_id_that_is_not_a_repo_id_is_one_line(spec, monkeypatch):
    monkeypatch.setattr(sinder_hub.backbones.timm, "create_model", lambda *a, **k: pytest.fail("timm was asked"))
    with pytest.raises(BackboneError) as raised:
        load_backbone(spec)
    message = str(raised.value)
    assert message.startswith(f"{spec}: not a valid hub repo id (") and "\n" not in message


@pytest.mark.slow
def test_a_config_that_asks_for_a_huge_model_is_refused_before_it_is_built(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    save_timm(small_vit(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["embed_dim"] = 96000
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sinder_hub.backbones, "machine_memory", lambda: 64 * 2**30)
    started = time.perf_counter()
    with pytest.raises(
        BackboneError, match=r"config.json: a model of [\d.]+ billion parameters .* than this machine's 64"
    ):
        load_backbone(folder)
    assert time.perf_counter() - started < 10  # built on the meta device, never allocated
    for value, expected in (("96", 'embed_dim is "96"'), (True, "embed_dim is true"), (0, "embed_dim is 0")):
        config["model_args"]["embed_dim"] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(BackboneError, match=f"model_args.{expected}; expected a whole number of at least 1"):
            load_backbone(folder)
    config["model_args"]["embed_dim"], config["model_args"]["num_heads"] = 30, 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="its model_args do not build .*divisible by num_heads"):
        load_backbone(folder)


@pytest.mark.slow
def test_a_transformers_config_that_asks_for_a_huge_model_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"model_type": "dinov2", "hidden_size": 96000, "num_attention_heads": 16, "num_hidden_layers": 12}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sinder_hub.backbones, "machine_memory", lambda: 64 * 2**30)
    with pytest.raises(BackboneError, match=r"config.json: a model of [\d.]+ billion parameters"):
        load_backbone(folder)


# --- 6: the smaller ones ----------------------------------------------------------------------------------------


def test_registers_refuses_an_output_inside_its_images(photos, capsys, no_model):
    output = photos / "ttr"
    code = cli(registers_argv(photos, output))
    one_error_line(capsys, code, 2, f"--output {output} lies inside --images {photos}")
    assert not output.exists()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_a_registers_run_in_one_line_and_leaves_nothing(name, photos, tmp_path, capsys, tiny_model,
                                                                      monkeypatch):  # fmt: skip
    class Killed(Exception):
        pass

    def killed(signum, frame):  # without a handler of the run's own, SIGTERM would end this test process
        raise Killed

    def pictures_then_signal(images, before, after, output, labels):
        (output / "before_after_p0.png").write_bytes(b"\x89PNG half")
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(5)
        pytest.fail("the signal did not stop the run")

    monkeypatch.setattr(sinder_hub.report, "write_pictures", pictures_then_signal)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        output = tmp_path / "out"
        output.mkdir()
        argv = registers_argv(photos, output, "--resolution", "56", "--threshold", "1e-3", "--highest-layer", "1",
                              "--top-k", "2", "--detection-block", "1")  # fmt: skip
        code = cli(argv)
        assert signal.getsignal(signal.SIGTERM) is killed  # the handler is given back
    finally:
        signal.signal(signal.SIGTERM, previous)
    line = one_error_line(capsys, code, 130, f"interrupted by {name}", f"--output {output}", "run the command again")
    assert "--resume" not in line
    assert list(output.iterdir()) == []  # no INCOMPLETE, no .lock, no picture, no registers file


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys):
    import sinder_hub.commands.export

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sinder_hub.commands.export, "main", interrupted)
    one_error_line(capsys, cli(["export", "x", "--to", "y"]), 130, "sinder-hub export: interrupted (Ctrl-C)")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--top-k", "100000"], f"--top-k 100000: expected 1 to {MAX_TOP_K} neurons"),
        (
            ["--resolution", "14000"],
            f"--resolution 14000: expected 0 (the model's own) or a multiple of its patch size "
            f"up to {MAX_RESOLUTION} px",
        ),  # fmt: skip
        (["--model", ""], "--model is required: expected a model spec"),
    ],
)
def test_registers_flags_out_of_bounds_are_refused_before_any_model(flags, expected, photos, tmp_path, capsys,
                                                                    no_model):  # fmt: skip
    output = tmp_path / "out"
    one_error_line(capsys, cli([*registers_argv(photos, output), *flags]), 2, expected)
    assert not output.exists()


def test_registers_images_given_an_image_file_names_images(photos, tmp_path, capsys, no_model):
    image = photos / "p0.png"
    code = cli(registers_argv(image, tmp_path / "out"))
    line = one_error_line(capsys, code, 2, f"--images {image} is an image file")
    assert "--data" not in line


def test_registers_at_a_resolution_of_one_patch_is_one_line_without_warnings(photos, tmp_path, capsys, tiny_model):
    output = tmp_path / "out"
    code = cli(registers_argv(photos, output, "--resolution", "14"))
    one_error_line(capsys, code, 2, "--resolution 14", "expected at least 42 px")  # error_line: nothing else printed
    assert not output.exists()


@pytest.mark.slow
def test_diagnose_at_a_resolution_of_one_patch_is_one_line_without_warnings(tmp_path, capsys):
    code = cli(["diagnose", "--model", "planted-gelu", "--resolution", "28", "--out", str(tmp_path / "out")])
    one_error_line(capsys, code, 2, "--resolution 28", "expected at least 42 px")


def test_an_empty_spec_is_refused(tmp_path, monkeypatch):
    save_timm(small_vit(), tmp_path)  # the working directory is a model folder: "" must not mean it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackboneError, match="an empty model spec; expected a timm name"):
        load_backbone("")


def test_every_command_says_sinder_hub_command(capsys):
    for name in COMMANDS:
        assert cli([name, "--no-such-flag"]) == 2
        assert error_line(capsys).startswith(f"error: sinder-hub {name}: ")
    assert cli(["registers", "--help"]) == 0
    helped = capsys.readouterr().out
    assert helped.startswith("usage: sinder-hub registers ") and "(default: None)" not in helped


def test_a_folder_marked_incomplete_does_not_load(tmp_path):
    folder = tmp_path / "run"
    save_timm(small_vit(), folder)
    (folder / "INCOMPLETE").write_text("")
    with pytest.raises(BackboneError, match=f"{folder} is marked INCOMPLETE: the run that writes it did not finish"):
        load_backbone(folder)
