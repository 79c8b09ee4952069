"""Fixtures shared by the test modules."""

import pytest

import sinder_hub.backbones


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model (checks that must come before any model)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", refuse)
