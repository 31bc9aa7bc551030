"""What the demo shows on the terminal: what it is about to run, progress while it runs (rich),
and at the end the showback tables and where the report is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.scenario import Scenario
from gpuledger.demo.pipeline import DemoBill, DemoConfig, DemoOutcome, DemoProgress
from gpuledger.demo.planning import DemoPlanning
from streams.reports.params import format_ms
from streams.reports.render import Tabular

REFRESH_S = 0.25


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def scenario_summary(scenario: Scenario) -> str:
    devices = scenario.device_count()
    mig = sum(len(g.mig_instances) for n in scenario.nodes for g in n.gpus)
    teams = {
        labels["team"]
        for labels in [*(p.labels for p in scenario.pods), *(n.labels for n in scenario.namespaces)]
        if "team" in labels
    }
    models = {p.inference.model for p in scenario.pods if p.inference is not None}
    return (
        f"{len(scenario.nodes)} nodes, {devices} GPU devices ({mig} MIG instances), "
        f"{len(scenario.pods)} pods in {len(scenario.namespaces)} namespaces "
        f"({len(teams)} teams, one untagged), {len(models)} models served"
    )


def print_intro(console: Console, config: DemoConfig, scenario: Scenario) -> None:
    wall_s = config.duration_s / config.speed
    pace = f"about {_clock(wall_s)} of wall time" if wall_s >= 10 else "as fast as it can"
    console.print(
        f"[bold]gpuledger demo[/bold]: {config.minutes:g} simulated minutes at "
        f"{config.speed:g}x ({pace}), no Docker, no GPU"
    )
    console.print(f"  cluster   {scenario_summary(scenario)}")
    console.print(f"  data      {config.dsn}")


def print_dashboard(console: Console, url: str | None) -> None:
    if url:
        console.print(f"  dashboard {url}  (live while the demo runs; Ctrl-C stops it early)")


@contextlib.asynccontextmanager
async def live_progress(console: Console, progress: DemoProgress) -> AsyncIterator[None]:
    """A progress bar over simulated time with the event and row counts, refreshed from
    `progress` until the block ends."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("sim {task.fields[sim]}"),
        TextColumn("| events {task.fields[events]}"),
        TextColumn("| rows {task.fields[rows]}"),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,  # piped output gets the summary lines only
    )
    task = bar.add_task(progress.phase, total=progress.sim_total_s or 1, sim="", events=0, rows=0)

    shown_url = [False]

    def refresh() -> None:
        if progress.dashboard_url and not shown_url[0]:
            shown_url[0] = True
            print_dashboard(console, progress.dashboard_url)
        bar.update(
            task,
            description=progress.phase,
            completed=progress.sim_done_s,
            sim=f"{_clock(progress.sim_done_s)} / {_clock(progress.sim_total_s)}",
            events=f"{progress.published.total:,}",
            rows=f"{progress.rows_written:,}",
        )

    async def keep_refreshing() -> None:
        while True:
            refresh()
            await asyncio.sleep(REFRESH_S)

    with bar:
        refresher = asyncio.create_task(keep_refreshing())
        try:
            yield
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            refresh()


def rich_table(tab: Tabular) -> Table:
    table = Table(title=tab.title, title_justify="left", show_edge=False, pad_edge=False)
    for i, header in enumerate(tab.headers):
        table.add_column(header, justify="right" if i >= tab.right_aligned_from else "left")
    last = len(tab.rows) - 1
    for i, row in enumerate(tab.rows):
        table.add_row(*row, end_section=i == last and bool(tab.footer))
    for row in tab.footer:
        table.add_row(*row, style="bold")
    return table


def print_tables(console: Console, tables: Sequence[Tabular]) -> None:
    for tab in tables:
        console.print()
        console.print(rich_table(tab))
        for note in tab.notes:
            console.print(f"  {note}", soft_wrap=True)


def print_outcome(console: Console, outcome: DemoOutcome) -> None:
    published = outcome.published
    console.print()
    if outcome.interrupted:
        console.print(
            f"[yellow]Stopped early[/yellow] at simulated {_clock(outcome.sim_done_s)}; "
            "reporting what was collected."
        )
    console.print(
        f"Collected {published.samples:,} GPU samples, {published.pod_events:,} pod events and "
        f"{published.token_deltas:,} token deltas; the worker wrote {outcome.rows_written:,} rows."
    )
    print_tables(console, outcome.by_team.table())
    print_tables(console, outcome.by_model.table())
    if outcome.bill is not None:
        print_bill(console, outcome.bill)
    if outcome.planning is not None:
        print_planning(console, outcome.planning)
    console.print()
    console.print(f"HTML report: {outcome.report_path}", soft_wrap=True)
    span = f"--from {format_ms(outcome.period.start_ms)} --to {format_ms(outcome.period.end_ms)}"
    console.print(
        f"Ask again: gpuledger report showback --clickhouse {outcome.dsn} {span} --by product",
        soft_wrap=True,
    )
    month = format_ms(outcome.period.start_ms)[:7]
    console.print(
        f"Chargeback (FOCUS 1.3): gpuledger export chargeback --clickhouse {outcome.dsn} "
        f"--period {month} -o gpuledger-chargeback-{month}.csv",
        soft_wrap=True,
    )
    console.print(
        f"Invoice: gpuledger export invoice --clickhouse {outcome.dsn} --period {month} --by team",
        soft_wrap=True,
    )
    if outcome.bill is not None:
        bill = outcome.bill
        hours = f"--from {format_ms(bill.period.start_ms)} --to {format_ms(bill.period.end_ms)}"
        console.print(
            f"Billed basis: gpuledger report showback --clickhouse {outcome.dsn} {hours} "
            "--basis billed",
            soft_wrap=True,
        )
        console.print(
            f"Price book vs bill: gpuledger report variance --clickhouse {outcome.dsn} {hours}",
            soft_wrap=True,
        )
        console.print(
            f"Import it again (nothing changes): gpuledger bill import {bill.path} "
            f"--clickhouse {outcome.dsn}",
            soft_wrap=True,
        )
    planning_commands(console, outcome)


def print_planning(console: Console, planning: DemoPlanning) -> None:
    """Forecast, the cost of scaling the busiest model, budgets, and request-based cost."""
    console.print()
    console.print("Planning, from the data just collected:", soft_wrap=True)
    print_tables(console, planning.tables())
    console.print(
        f"  budgets: {planning.budgets_path} (the demo's, set from the forecast so that each "
        "status shows; `gpuledger worker --budgets FILE` exports them as Prometheus gauges)",
        soft_wrap=True,
    )


def planning_commands(console: Console, outcome: DemoOutcome) -> None:
    planning = outcome.planning
    if planning is None:
        return
    dsn = outcome.dsn
    month = format_ms(planning.month.start_ms)[:7]
    console.print(
        f"Forecast: gpuledger report forecast --clickhouse {dsn} --period {month} "
        f"--as-of {format_ms(planning.as_of_ms)}",
        soft_wrap=True,
    )
    if planning.model is not None:
        period = outcome.period
        span = f"--from {format_ms(period.start_ms)} --to {format_ms(period.end_ms)}"
        console.print(
            f"Scale a model: gpuledger plan --clickhouse {dsn} {span} --model {planning.model} "
            "--growth 3x",
            soft_wrap=True,
        )
    console.print(
        f"Budgets: gpuledger report budget --clickhouse {dsn} --budgets {planning.budgets_path} "
        f"--period {month} --as-of {format_ms(planning.as_of_ms)}",
        soft_wrap=True,
    )
    period = outcome.period
    console.print(
        f"Requests vs usage: gpuledger report requests --clickhouse {dsn} "
        f"--from {format_ms(period.start_ms)} --to {format_ms(period.end_ms)}",
        soft_wrap=True,
    )


def print_bill(console: Console, bill: DemoBill) -> None:
    """The generated cloud bill, trued up: billed-basis showback and what it adds up to."""
    console.print()
    console.print(
        f"Cloud bill: {bill.path} (the demo's AWS FOCUS 1.2 bill for its nodes' hours, "
        "generated), imported and trued up.",
        soft_wrap=True,
    )
    print_tables(console, bill.by_team.table())
    same = "=" if bill.by_team.total_usd == bill.gpu_effective_cost else "!="
    console.print(
        f"  billed basis total {bill.by_team.total_usd:f} {same} the bill's EffectiveCost of its "
        f"GPU instances {bill.gpu_effective_cost:f} USD (unmetered GPU spend "
        f"{bill.unmetered_cost:f} on its own line)",
        soft_wrap=True,
    )
