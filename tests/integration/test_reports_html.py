"""The HTML report in headless Chromium: it loads with no console errors, every chart draws,
nothing is fetched from the network, and a screenshot is kept for people to look at. The
month-end forecast section on a generated month with known answers."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from row_builders import cost_row
from test_reports_data import HOUR_MS, MIN_MS, T0_MS, cluster_rows, fresh_store

from streams.reports.budgets import parse_budgets
from streams.reports.html_forecast import read_forecast_view, report_month
from streams.reports.html_report import html_report
from streams.reports.params import DAY_MS, Period, parse_month
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
        "chart-forecast",
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
    assert "No GPU cost this month yet." in text


def _steady_month(days: int) -> list[CostRow]:
    """From 2026-11-01: team search at 2 USD/h and idle GPUs at 0.25 USD/h, one row an hour."""
    rows = []
    for h in range(days * 24):
        t = T0_MS + h * HOUR_MS
        rows.append(cost_row(t, cost_usd=Decimal(2)))
        rows.append(
            cost_row(
                t, "GPU-2", kind="idle", team="__idle__", namespace="", pod="", pod_uid="",
                product="", cost_center="", cost_usd=Decimal("0.25"),
            )
        )  # fmt: skip
    return rows


def test_the_forecast_path_of_a_steady_month_is_days_times_the_rate() -> None:
    store = fresh_store()
    store.insert_rows(_steady_month(10))
    month = parse_month("2026-11")
    view = read_forecast_view(store, month, as_of_ms=T0_MS + 10 * DAY_MS)
    assert view.chart.daily_usd == (Decimal(54),) * 10
    assert [p.day for p in view.chart.path] == list(range(11, 31))
    for p in view.chart.path:  # the fleet spends 54 USD a day: the path is 54 x days, exactly
        assert abs(p.point_usd - 54 * p.day) <= Decimal("0.01"), p
        assert p.high95_usd - p.low95_usd <= Decimal("0.01")


def test_the_paths_last_point_is_the_tables_total_mid_day_and_metered_from_mid_month() -> None:
    # Metering from the 4th at 09:00, a busy afternoon every day, as of the 19th at 15:30: the
    # path is forecast from the same hours, profile and metering start as the table's total.
    store = fresh_store()
    rows = [
        cost_row(T0_MS + h * HOUR_MS, cost_usd=Decimal(1) + Decimal((h % 24) // 12) * 2)
        for h in range(3 * 24 + 9, 18 * 24 + 16)
    ]
    store.insert_rows(rows)
    as_of_ms = T0_MS + 18 * DAY_MS + 15 * HOUR_MS + 30 * MIN_MS
    view = read_forecast_view(store, parse_month("2026-11"), as_of_ms=as_of_ms)
    total, end = view.report.total.forecast, view.chart.path[-1]
    assert total.method == "ets_seasonal" and end.day == 30
    assert (end.point_usd, end.low80_usd, end.high80_usd, end.low95_usd, end.high95_usd) == (
        total.total_usd, total.low80_usd, total.high80_usd, total.low95_usd, total.high95_usd,
    )  # fmt: skip
    assert sum(view.chart.daily_usd) == total.month_to_date_usd == sum(r.cost_usd for r in rows)


def _section(text: str) -> str:
    section = text[text.index("<h2>Month-end forecast") :]
    return section[: section.index("</section>")]


def test_the_html_forecast_section_shows_the_month_its_chart_and_a_row_per_team() -> None:
    store = fresh_store()
    store.insert_rows(_steady_month(10))
    section = _section(html_report(store, Period(T0_MS + 5 * DAY_MS, T0_MS + 10 * DAY_MS)))
    assert "Month-end forecast, 2026-11, as of 2026-11-11T00:00:00Z" in section
    chart = _svg(section, "chart-forecast")
    assert chart.count('<rect class="bar"') == 10  # the month's days so far, not the period's
    assert chart.count('class="band95"') == 1 and chart.count('class="band80"') == 1
    assert "2026-11-10: 54.00 USD that day, 540.00 USD to date" in chart
    assert "forecast at month end: 1,620.00 USD" in section
    rows = re.findall(r'<tr class="(\w+)"><td>([^<]*)</td>((?:<td[^>]*>[^<]*</td>)*)</tr>', section)
    cells = {label: (kind, re.findall(r">([^<]*)</td>", rest)) for kind, label, rest in rows}
    assert cells["search"] == (
        "allocated",
        ["480.00", "1,440.00", "1,440.00-1,440.00", "ets_trend"],
    )
    assert cells["(idle GPU time)"][1][:2] == ["60.00", "180.00"]
    assert cells["total (all metered GPU cost)"] == (
        "total",
        ["540.00", "1,620.00", "1,620.00-1,620.00", "ets_trend"],
    )


def test_a_period_to_the_end_of_the_month_shows_the_month_complete() -> None:
    store = fresh_store()
    store.insert_rows(_steady_month(3))
    section = _section(html_report(store, parse_month("2026-11")))
    assert "Month-end forecast, 2026-11, as of 2026-12-01T00:00:00Z" in section
    chart = _svg(section, "chart-forecast")
    assert chart.count('<rect class="bar"') == 30 and "band95" not in section
    assert (
        ">162.00</td><td class=n>162.00</td><td class=n>162.00-162.00</td><td class=n>complete<"
        in section
    )


def test_a_forecast_as_of_earlier_than_the_period_end_reads_no_later_spend() -> None:
    store = fresh_store()
    store.insert_rows(_steady_month(10))
    section = _section(html_report(store, parse_month("2026-11"), as_of_ms=T0_MS + 4 * DAY_MS))
    assert ", as of 2026-11-05T00:00:00Z" in section
    assert _svg(section, "chart-forecast").count('<rect class="bar"') == 4
    assert "spend to date: 216.00 USD" in section


def test_the_report_month_is_the_month_of_the_periods_last_instant() -> None:
    nov, dec = parse_month("2026-11"), parse_month("2026-12")
    assert report_month(nov) == nov  # ends at 2026-12-01T00:00Z: its last instant is November's
    assert report_month(Period(nov.start_ms + DAY_MS, dec.start_ms + DAY_MS)) == dec
    assert report_month(Period(dec.start_ms, dec.start_ms)) == dec


def _table_rows(section: str) -> list[list[str]]:
    return [
        re.findall(r"<td[^>]*>([^<]*)</td>", row)
        for row in re.findall(r"<tr>((?:<td[^>]*>[^<]*</td>)+)</tr>", section)
    ]


def _section_titled(text: str, title: str) -> str:
    section = text[text.index(f"<h2>{title}") :]
    return section[: section.index("</section>")]


def test_budgets_are_shown_against_the_forecast_when_given() -> None:
    store = fresh_store()
    store.insert_rows(_steady_month(10))
    budgets = parse_budgets(
        "budgets:\n  - team: search\n    monthly_usd: 1000\n  - team: recs\n    monthly_usd: 50\n",
        source="budgets.yaml",
    )
    period = Period(T0_MS, T0_MS + 10 * DAY_MS)
    assert "GPU spend against budgets" not in html_report(store, period)
    text = html_report(store, period, budgets=budgets)
    section = _section_titled(text, "GPU spend against budgets (budgets.yaml), 2026-11")
    rows = _table_rows(section)
    # 480 USD to date, 1,440 at month end: over the 100 % threshold; the path (48 USD a day
    # from 480 on the 11th) reaches 1,000 USD 10 5/6 days later, on the 21st
    assert rows[0] == [
        "team", "search", "forecast over", "100%", "1,000.00", "480.00", "48.0%", "1,440.00",
        "1,440.00-1,440.00", "144.0%", "2026-11-21",
    ]  # fmt: skip
    assert rows[1][:6] == ["team", "recs", "on track", "-", "50.00", "0.00"]
    assert '<td class="bad">forecast over</td>' in section
    assert '<td class="ok">on track</td>' in section


def test_request_based_cost_is_shown_beside_usage_over_the_period() -> None:
    store = fresh_store()
    store.insert_rows(_steady_month(10))
    period = Period(T0_MS, T0_MS + 10 * DAY_MS)
    title = "GPU cost by team: usage-based (gpuledger) vs request-based"
    no_requests = _section_titled(html_report(store, period), title)
    assert "No pod held a GPU request in this period" in no_requests
    columns = [
        "cluster", "node", "namespace", "pod", "pod_uid", "team", "product", "cost_center",
        "requests", "time", "event_id",
    ]  # fmt: skip
    event = (
        "c1",
        "n1",
        "ns",
        "p",
        "uid-p",
        "search",
        "web",
        "cc",
        {"nvidia.com/gpu": 1},
        T0_MS,
        "e1",
    )
    store.insert_values("pod_gpu_requests", columns, [event])
    rows = {
        row[0]: row[1:] for row in _table_rows(_section_titled(html_report(store, period), title))
    }
    # n1 meters two devices and reports no capacity: one requested GPU is half of the node's
    # 2.25 USD an hour, 270 USD over the 10 days; the other half is unrequested
    assert rows["search"] == ["480.00", "270.00", "-210.00", "0.56x"]
    assert rows["(unrequested)"][:2] == ["0.00", "270.00"]
    assert rows["total (all metered GPU cost)"][:3] == ["540.00", "540.00", "0.00"]


def test_without_planning_the_report_has_no_forecast_budget_or_request_section() -> None:
    store = fresh_store()
    store.insert_rows(_steady_month(4))
    budgets = parse_budgets("budgets:\n  - team: search\n    monthly_usd: 1000\n")
    text = html_report(store, Period(T0_MS, T0_MS + 4 * DAY_MS), budgets=budgets, planning=False)
    assert "Showback by team" in text and "chart-team-cost" in text
    for title in ("Month-end forecast", "GPU spend against budgets", "request-based"):
        assert title not in text
