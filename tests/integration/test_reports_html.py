"""The HTML report in headless Chromium: it loads with no console errors, every chart draws,
nothing is fetched from the network, and a screenshot is kept for people to look at."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_reports_data import HOUR_MS, MIN_MS, T0_MS, cluster_rows, fresh_store

from streams.reports.html_report import html_report
from streams.reports.params import Period
from streams.reports.showback import showback
from streams.rows import CostRow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(tempfile.gettempdir()) / "gpuledger-report-screenshot.png"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

CHART_STATS = """JSON.stringify(Array.from(document.querySelectorAll('svg.chart')).map(s => ({
  id: s.id, w: s.getBoundingClientRect().width, h: s.getBoundingClientRect().height,
  bars: s.querySelectorAll('rect.bar').length})))"""


async def _drive(url: str, port_file: Path) -> tuple[list[str], list[dict[str, Any]], bytes]:
    # Chromium writes its port once it listens: seconds on a busy machine (the caller's
    # timeout bounds the wait).
    while not (port_file.exists() and port_file.read_text().strip()):
        await asyncio.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            pages = await resp.json()
        ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
        async with http.ws_connect(ws_url, max_msg_size=0) as ws:
            ids = iter(range(1, 10_000))
            problems: list[str] = []

            async def call(method: str, **params: Any) -> dict[str, Any]:
                n = next(ids)
                await ws.send_json({"id": n, "method": method, "params": params})
                while True:
                    msg = json.loads((await ws.receive()).data)
                    _collect(msg, problems)
                    if msg.get("id") == n:
                        return dict(msg.get("result", {}))

            for domain in ("Runtime", "Log", "Page", "Network"):
                await call(f"{domain}.enable")
            await call(
                "Emulation.setDeviceMetricsOverride",
                width=1000,
                height=2400,
                deviceScaleFactor=1,
                mobile=False,
            )
            await call("Page.navigate", url=url)
            await asyncio.sleep(1.5)
            stats = await call("Runtime.evaluate", expression=CHART_STATS)
            shot = await call("Page.captureScreenshot", format="png")
            return problems, json.loads(stats["result"]["value"]), base64.b64decode(shot["data"])


def _collect(msg: dict[str, Any], problems: list[str]) -> None:
    method, params = msg.get("method"), msg.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
        problems.append(f"console {params['type']}: {params.get('args')}")
    elif method == "Runtime.exceptionThrown":
        problems.append(f"exception: {params.get('exceptionDetails')}")
    elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
        problems.append(f"log: {params['entry'].get('text')}")
    elif method == "Network.requestWillBeSent":
        request_url = params["request"]["url"]
        if not request_url.startswith(("file:", "data:")):
            problems.append(f"network request to {request_url}")


def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    store = fresh_store()
    store.insert_rows(cluster_rows(hours=30, window_minutes_step=13))
    page = tmp_path / "report.html"
    page.write_text(html_report(store, Period(T0_MS, T0_MS + 30 * HOUR_MS)), encoding="utf-8")
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        problems, charts, png = asyncio.run(
            asyncio.wait_for(_drive(page.as_uri(), profile / "DevToolsActivePort"), 60)
        )
    finally:
        browser.kill()
        browser.wait()
    assert problems == []
    ids = {c["id"] for c in charts}
    assert ids == {
        "chart-team-cost",
        "chart-cost-per-token",
        "chart-utilisation",
        "chart-untagged",
        "chart-top-pods",
    }
    assert all(c["w"] > 100 and c["h"] > 20 and c["bars"] > 0 for c in charts), charts
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    SCREENSHOT.write_bytes(png)


def test_a_ten_minute_period_is_charted_per_minute() -> None:
    store = fresh_store()
    rows = [
        r
        for r in cluster_rows(hours=1, window_minutes_step=1)
        if r.window_start_ms < T0_MS + 10 * MIN_MS
    ]
    store.insert_rows(rows)
    period = Period(T0_MS, T0_MS + 10 * MIN_MS)
    text = html_report(store, period)
    assert "Cost by team over time (per minute)" in text and "USD per minute" in text
    team_chart = _svg(text, "chart-team-cost")
    starts = set(re.findall(r'<rect class="bar" x="([0-9.]+)"', team_chart))
    assert len(starts) == 10  # one stack per minute
    # Two bars (allocated, idle) per minute, and the minute values add up to the period.
    assert _svg(text, "chart-utilisation").count('<rect class="bar"') == 20
    costs = [r for r in rows if isinstance(r, CostRow)]
    total = sum(r.cost_usd for r in costs)
    report = showback(store, period, "team")
    assert report.total_usd == total and report.reconciles
    assert f"${report.total_cents_usd}" in text
    assert f">{report.gpu_hours:.3f}<" in text  # GPU-hours to the thousandth, not 0.3


def _svg(text: str, chart_id: str) -> str:
    start = text.index(f'id="{chart_id}"')
    return text[start : text.index("</svg>", start)]


def test_html_report_of_an_empty_period_is_still_a_page() -> None:
    store = fresh_store()
    text = html_report(store, Period(T0_MS, T0_MS + HOUR_MS))
    assert "No GPU cost in this period." in text and "<svg" not in text.split("<main>")[0]
