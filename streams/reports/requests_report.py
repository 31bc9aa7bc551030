"""The request-vs-usage report: each owner's GPU cost under gpuledger's usage-based allocation
(showback) beside what request-based tools (OpenCost, Kubecost) would charge it, whole devices
per request, with the difference. Both columns share one total: the period's metered GPU money.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from streams.reports.money import largest_remainder_cents, round_total
from streams.reports.params import Period, format_ms
from streams.reports.render import Tabular, display, money
from streams.reports.requests import RequestAllocation
from streams.reports.showback import (
    ALLOCATED,
    HOST_LINE,
    IDLE_LINE,
    UNTAGGED_LINE,
    ShowbackReport,
)
from streams.rows import UNKNOWN, UNTAGGED

UNREQUESTED_LINE = "unrequested"
REQUEST_DIMENSIONS = ("team", "product", "namespace", "cost_center")
FAR_MORE_RATIO = Decimal(2)  # a line whose requests cost this many times its use is named
_NAMED_LINES = 5  # at most this many lines named in each note
_ORDER = {ALLOCATED: 0, UNTAGGED_LINE: 1, HOST_LINE: 2, IDLE_LINE: 3, UNREQUESTED_LINE: 4}
_LABELS = {
    HOST_LINE: "(host processes, no pod)",
    IDLE_LINE: "(idle GPU time)",
    UNREQUESTED_LINE: "(unrequested)",
}
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class RequestsLine:
    key: str
    line_kind: str  # allocated | untagged | host | idle | unrequested
    usage_usd: Decimal
    request_usd: Decimal
    usage_cents_usd: Decimal  # largest-remainder cents of each column: they add up to its total
    request_cents_usd: Decimal

    @property
    def difference_usd(self) -> Decimal:
        """What request-based allocation charges the line beyond its use (negative: less)."""
        return self.request_usd - self.usage_usd

    @property
    def difference_cents_usd(self) -> Decimal:
        return self.request_cents_usd - self.usage_cents_usd

    @property
    def label(self) -> str:
        return _LABELS.get(self.line_kind) or display(self.key)

    @property
    def request_to_usage(self) -> Decimal | None:
        """Request-based cost over usage-based cost, to 2 places; None without usage and on
        the idle, host and unrequested lines, which no one requests."""
        if self.usage_usd <= 0 or self.line_kind not in (ALLOCATED, UNTAGGED_LINE):
            return None
        return (self.request_usd / self.usage_usd).quantize(Decimal("0.01"))


@dataclass(frozen=True, slots=True)
class RequestsReport:
    period: Period
    by: str
    lines: tuple[RequestsLine, ...]
    usage_total_usd: Decimal  # showback's total: all metered GPU cost of the period
    request_total_usd: Decimal  # the node-hours' money split by requests: the same money
    allocation: RequestAllocation
    notes: tuple[str, ...] = field(default=())

    @property
    def total_usd(self) -> Decimal:
        return self.usage_total_usd

    @property
    def total_cents_usd(self) -> Decimal:
        return round_total(self.usage_total_usd)

    @property
    def unrequested_usd(self) -> Decimal:
        return self.allocation.unrequested_usd

    @property
    def reconciles(self) -> bool:
        usage = sum((line.usage_usd for line in self.lines), _ZERO)
        request = sum((line.request_usd for line in self.lines), _ZERO)
        return usage == request == self.usage_total_usd == self.request_total_usd

    def table(self) -> Sequence[Tabular]:
        by = self.by.replace("_", " ")
        headers = (by, "usage USD", "requests USD", "difference", "requests / usage")
        rows = tuple(
            (
                line.label,
                money(line.usage_cents_usd),
                money(line.request_cents_usd),
                _signed(line.difference_cents_usd),
                "-" if line.request_to_usage is None else f"{line.request_to_usage:,.2f}x",
            )
            for line in self.lines
        )
        total = money(self.total_cents_usd)
        footer = (
            (
                "total (all metered GPU cost)",
                total,
                money(round_total(self.request_total_usd)),
                "0.00",
                "",
            ),
        )
        check = "reconciles" if self.reconciles else "DOES NOT RECONCILE"
        notes = (
            "usage: gpuledger's showback (each device's time split by use; idle time and host "
            "processes are lines of their own); requests: what OpenCost and Kubecost charge, "
            "whole devices per request: in each hour on each node, the GPU money of the devices "
            "a resource names / the node's capacity of it = one unit's price; a pod pays count "
            "x unit price x the fraction of the hour it held the request",
            f"both columns add up to the same {total} USD ({check}; each column rounded to "
            "cents by largest remainder); difference = requests - usage",
            *self.notes,
        )
        title = (
            f"GPU cost by {by}: usage-based (gpuledger) vs request-based (whole devices), "
            f"{format_ms(self.period.start_ms)} to {format_ms(self.period.end_ms)}"
        )
        return (Tabular(title, headers, rows, footer, notes),)

    def records(self) -> list[dict[str, Any]]:
        return [
            {
                self.by: line.key,
                "label": line.label,
                "line_kind": line.line_kind,
                "usage_usd": line.usage_usd,
                "usage_usd_cents": line.usage_cents_usd,
                "request_usd": line.request_usd,
                "request_usd_cents": line.request_cents_usd,
                "difference_usd": line.difference_usd,
                "difference_usd_cents": line.difference_cents_usd,
                "request_to_usage": line.request_to_usage,
            }
            for line in self.lines
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "requests",
            "from": format_ms(self.period.start_ms),
            "to": format_ms(self.period.end_ms),
            "by": self.by,
            "currency": "USD",
            "lines": self.records(),
            "totals": self.totals,
            "notes": list(self.notes),
        }

    @property
    def totals(self) -> dict[str, Any]:
        """Both columns' totals (equal: the period's metered GPU cost), the unrequested part
        of the request column, and whether every line adds up to them."""
        return {
            "usage_usd": self.usage_total_usd,
            "request_usd": self.request_total_usd,
            "unrequested_usd": self.unrequested_usd,
            "total_usd": self.total_usd,
            "total_usd_cents": self.total_cents_usd,
            "reconciles": self.reconciles,
        }


def _signed(cents: Decimal) -> str:
    return f"+{money(cents)}" if cents > 0 else money(cents)


def request_line_kind(key: str) -> str:
    """The line a request-side owner value goes to: untagged when the label was missing."""
    return UNTAGGED_LINE if key in (UNTAGGED, UNKNOWN) else ALLOCATED


def build_report(
    period: Period,
    by: str,
    usage: ShowbackReport,
    allocation: RequestAllocation,
    extra_notes: Sequence[str] = (),
) -> RequestsReport:
    """Showback's lines beside the request-based allocation's, one line per (kind, key)."""
    usage_of: dict[tuple[str, str], Decimal] = {}
    for s in usage.lines:
        usage_of[(s.line_kind, s.key)] = usage_of.get((s.line_kind, s.key), _ZERO) + s.cost_usd
    request_of: dict[tuple[str, str], Decimal] = {}
    for key, usd in allocation.by_owner_usd.items():
        kind_key = (request_line_kind(key), key)
        request_of[kind_key] = request_of.get(kind_key, _ZERO) + usd
    if allocation.unrequested_usd or allocation.total_usd:
        request_of[(UNREQUESTED_LINE, "")] = allocation.unrequested_usd
    keys = sorted(
        {*usage_of, *request_of},
        key=lambda k: (
            _ORDER.get(k[0], len(_ORDER)),
            -request_of.get(k, _ZERO),
            -usage_of.get(k, _ZERO),
            k[1],
        ),
    )
    usage_cents = largest_remainder_cents([usage_of.get(k, _ZERO) for k in keys])
    request_cents = largest_remainder_cents([request_of.get(k, _ZERO) for k in keys])
    lines = tuple(
        RequestsLine(
            key=key,
            line_kind=kind,
            usage_usd=usage_of.get((kind, key), _ZERO),
            request_usd=request_of.get((kind, key), _ZERO),
            usage_cents_usd=u,
            request_cents_usd=r,
        )
        for (kind, key), u, r in zip(keys, usage_cents, request_cents, strict=True)
    )
    notes = [*_findings(lines, usage.total_usd, by), *_allocation_notes(allocation), *extra_notes]
    return RequestsReport(
        period, by, lines, usage.total_usd, allocation.total_usd, allocation, tuple(notes)
    )


def _findings(lines: Sequence[RequestsLine], total_usd: Decimal, by: str) -> list[str]:
    """What the columns say, in words: who requests far more than it uses, who uses GPUs it
    never requested, and where idle time goes under requests."""
    notes: list[str] = []
    owners = [line for line in lines if line.line_kind in (ALLOCATED, UNTAGGED_LINE)]
    floor = total_usd / 100  # name only differences of at least 1 % of the total
    far = [
        line
        for line in owners
        if line.usage_usd > 0
        and line.request_usd >= FAR_MORE_RATIO * line.usage_usd
        and line.difference_usd >= floor
    ]
    far.sort(key=lambda line: -line.difference_usd)
    for line in far[:_NAMED_LINES]:
        notes.append(
            f"{by.replace('_', ' ')} {line.label} requests far more than it uses: "
            f"{money(line.request_cents_usd)} under requests vs {money(line.usage_cents_usd)} "
            f"used ({line.request_to_usage}x); on shared GPUs charged by use it pays "
            f"{money(-line.difference_cents_usd).lstrip('-')} less"
        )
    unused = [line for line in owners if line.usage_usd == 0 and line.request_usd >= floor]
    unused.sort(key=lambda line: -line.request_usd)
    for line in unused[:_NAMED_LINES]:
        notes.append(
            f"{by.replace('_', ' ')} {line.label} holds GPU requests it never used: "
            f"{money(line.request_cents_usd)} under requests, nothing under usage"
        )
    unasked = [
        line
        for line in owners
        if line.request_usd == 0 and line.usage_usd > 0 and line.usage_usd >= floor
    ]
    unasked.sort(key=lambda line: -line.usage_usd)
    for line in unasked[:_NAMED_LINES]:
        notes.append(
            f"{by.replace('_', ' ')} {line.label} used {money(line.usage_cents_usd)} of GPU "
            "time with no GPU request (a pod that sees GPUs it did not request): request-based "
            "tools charge it nothing"
        )
    idle = sum((line.usage_usd for line in lines if line.line_kind == IDLE_LINE), _ZERO)
    unrequested = sum(
        (line.request_usd for line in lines if line.line_kind == UNREQUESTED_LINE), _ZERO
    )
    if idle or unrequested:
        notes.append(
            f"idle GPU time ({money(round_total(idle))} under usage) is paid under requests by "
            "whoever holds the idle devices; (unrequested) "
            f"{money(round_total(unrequested))}: devices no request covered (nobody's, or used "
            "by pods without a request)"
        )
    return notes


def _allocation_notes(allocation: RequestAllocation) -> list[str]:
    notes: list[str] = []
    if allocation.oversubscribed:
        spans = sum(o.spans for o in allocation.oversubscribed)
        worst = sorted(allocation.oversubscribed, key=lambda o: -o.peak_ratio)[:_NAMED_LINES]
        named = ", ".join(
            f"{o.node} {o.resource} up to {float(o.peak_ratio):.2f}x capacity" for o in worst
        )
        notes.append(
            f"requests beyond the node's capacity in {spans:,} node-hour(s) ({named}): the "
            "charges there are scaled down pro rata, so a node's money is charged once"
        )
    if allocation.estimated:
        named = ", ".join(
            f"{node} {resource}" for _, node, resource in allocation.estimated[:_NAMED_LINES]
        )
        more = len(allocation.estimated) - _NAMED_LINES
        notes.append(
            f"no capacity reported for {named}{f' and {more} more' if more > 0 else ''} "
            f"({allocation.estimated_spans:,} node-hour(s)): one unit priced over the devices "
            "of its class metered on the node that hour"
        )
    return notes
