"""Fixtures for the evaluation tests (data generation lives in :mod:`tests.evaluation._fixtures`)."""

from __future__ import annotations

import copy
import json

import pytest

from tests.evaluation._fixtures import make_coco_fixture


@pytest.fixture(scope="session")
def coco_fixture():
    return make_coco_fixture()


@pytest.fixture
def gt(coco_fixture):
    return copy.deepcopy(coco_fixture[0])


@pytest.fixture
def results(coco_fixture):
    return copy.deepcopy(coco_fixture[1])


@pytest.fixture
def write_json(tmp_path):
    def _write(name, obj):
        p = tmp_path / name
        p.write_text(json.dumps(obj))
        return p

    return _write
