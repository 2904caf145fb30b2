"""Fixtures over the tiny language models of `tiny_lms`; every test gets a freshly built model."""

from __future__ import annotations

import pytest

from tests.llm.tiny_lms import FAMILIES, fitted, make_model, make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return make_model(family)


@pytest.fixture
def steering(family):
    return fitted(family)
