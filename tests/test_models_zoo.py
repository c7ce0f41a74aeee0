"""tools/model_zoo.py reproduces the published parameter counts (to 0.01 M) and MACs (within 1 %)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import rpe_models

TOOL = Path(__file__).resolve().parents[1] / "tools" / "model_zoo.py"
RELEASED = [name for name, entry in rpe_models.MODEL_ZOO.items() if entry.released]


@pytest.fixture(scope="module")
def model_zoo():
    spec = importlib.util.spec_from_file_location("model_zoo_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(model_zoo) -> dict[str, dict]:
    return {row["name"]: row for row in model_zoo.zoo_rows()}


def test_released_models() -> None:
    assert len(RELEASED) == 6


@pytest.mark.parametrize("name", RELEASED)
def test_matches_published(rows: dict[str, dict], name: str) -> None:
    row, entry = rows[name], rpe_models.MODEL_ZOO[name]
    assert f"{row['params_m']:.2f}" == f"{entry.params_m:.2f}"
    assert abs(row["macs_m"] - entry.macs_m) / entry.macs_m < 0.01
    assert (row["top1"], row["top5"]) == (entry.top1, entry.top5) and row["source"]


def test_value_encodings_are_cheaper_here(rows: dict[str, dict]) -> None:
    for row in rows.values():
        if row["rpe_v"]:
            assert row["macs_ours_m"] < row["macs_m"]
        else:
            assert row["macs_ours_m"] == row["macs_m"]


def test_markdown_and_json_output(model_zoo, capsys: pytest.CaptureFixture[str]) -> None:
    name = "deit_tiny_patch16_224_ctx_product_50_shared_k"
    model_zoo.main(["--json", name])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == name and row["params_m"] == 5.76 and {"macs_m", "macs_ours_m", "top1", "top5"} <= set(row)
    model_zoo.main([name])
    table = capsys.readouterr().out
    assert table.startswith("| Model | RPE-Q | RPE-K | RPE-V | #Params(M) | MACs(M)")
    assert f"| {name} |  | ✔ |  | 5.76 | 1276 |" in table and "73.7" in table
