import pytest

from sinder_hub.errors import InputError
from sinder_hub.variants import MAX_VARIANTS, Variant, parse_variants


def test_labels_default_to_what_each_spec_is(tmp_path):
    run = tmp_path / "giant"
    run.mkdir()
    (run / "repair_report.json").write_text("{}")
    registers = tmp_path / "ttr"
    registers.mkdir()
    (registers / "test_time_registers.json").write_text("{}")
    variants = parse_variants(
        "vit_giant_patch14_dinov2.lvd142m", [str(run), str(registers), "vit_giant_patch14_reg4_dinov2.lvd142m"]
    )
    assert [v.label for v in variants] == ["original", "sinder", "registers", "vit_giant_patch14_reg4_dinov2"]
    assert variants[1] == Variant("sinder", str(run))


def test_explicit_labels_and_unique_defaults(tmp_path):
    variants = parse_variants("a=planted-swiglu", ["planted-swiglu", "planted-swiglu", "original=planted-gelu"])
    assert [v.label for v in variants] == ["a", "planted-swiglu", "planted-swiglu-2", "original"]
    assert [v.spec for v in variants] == ["planted-swiglu", "planted-swiglu", "planted-swiglu", "planted-gelu"]


def test_an_existing_path_with_an_equals_sign_is_a_spec(tmp_path):
    folder = tmp_path / "lr=0.01"
    folder.mkdir()
    (variant,) = parse_variants(str(folder))
    assert variant == Variant("original", str(folder))


def test_too_many_variants_and_repeated_labels_are_one_line_errors():
    with pytest.raises(InputError, match=f"at most {MAX_VARIANTS - 1} specs besides --model"):
        parse_variants("planted-swiglu", ["planted-gelu"] * MAX_VARIANTS)
    with pytest.raises(InputError, match="label 'x' is given twice"):
        parse_variants("x=planted-swiglu", ["x=planted-gelu"])
