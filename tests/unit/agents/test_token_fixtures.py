"""Every inference-server fixture folder: two scrapes of its own pages give exactly the deltas in
its expected.json (and expected_idle.json for a server's first requests after an idle scrape)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents.metrics import TokensMetrics
from agents.token_scraper import ScrapeTarget, TokenScraper

FIXTURES = Path(__file__).parents[2] / "fixtures" / "inference_servers"
ANNOTATED = "annotated/model"  # the pod's gpuledger.io/model annotation
NO_MODEL_LABEL = {"unknown", "undefined"}  # expected.json keys of servers that name no model
CASES = [
    pytest.param(folder, expected, id=f"{folder.name}:{expected}")
    for folder in sorted(p for p in FIXTURES.iterdir() if p.is_dir())
    for expected in ("expected.json", "expected_idle.json")
    if (folder / expected).exists()
]


def _scraper() -> TokenScraper:
    async def never(_: ScrapeTarget) -> str:
        raise AssertionError("not fetched")

    return TokenScraper("c", TokensMetrics(CollectorRegistry(), "c", "n"), never, lambda: 0.0)


def _deltas(folder: Path, spec: dict[str, Any], default_model: str) -> dict[str, Any]:
    scraper = _scraper()
    target = ScrapeTarget("ns", "pod", "uid-1", "http://10.0.0.1:8000/metrics", default_model)
    first, second = ((folder / name).read_text() for name in spec["scrapes"])
    assert scraper.observe(target, first, 100.0) == []  # the pod's first scrape: a baseline
    return {e.data.model: e.data for e in scraper.observe(target, second, 115.0)}


@pytest.mark.parametrize(("folder", "expected_file"), CASES)
def test_two_scrapes_give_the_expected_deltas(folder: Path, expected_file: str) -> None:
    spec = json.loads((folder / expected_file).read_text())
    tolerance = float(spec.get("float_tolerance", 1e-9))
    got = _deltas(folder, spec, ANNOTATED)
    want = {
        (ANNOTATED if model in NO_MODEL_LABEL else model): values
        for model, values in spec["models"].items()
    }
    assert set(got) == set(want)
    for model, values in want.items():
        delta = got[model]
        assert delta.interval_s == 15
        for field in ("prompt_tokens", "completion_tokens", "requests", "cached_tokens"):
            assert getattr(delta, field) == values[field], (model, field)
        for field in ("prefill_s", "decode_s"):
            expected = values[field]
            actual = getattr(delta, field)
            if expected is None:
                assert actual is None, (model, field)
            else:
                assert actual == pytest.approx(expected, abs=tolerance), (model, field)


@pytest.mark.parametrize(("folder", "expected_file"), CASES)
def test_without_an_annotation_a_server_that_names_no_model_reports_unknown(
    folder: Path, expected_file: str
) -> None:
    spec = json.loads((folder / expected_file).read_text())
    got = _deltas(folder, spec, "unknown")
    want = {("unknown" if m in NO_MODEL_LABEL else m) for m in spec["models"]}
    assert set(got) == want
    assert "undefined" not in got


def test_every_folder_is_covered() -> None:
    folders = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert folders <= {case.values[0].name for case in CASES}  # type: ignore[union-attr]
    assert len(folders) >= 10
