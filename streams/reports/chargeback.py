"""Chargeback export in FOCUS 1.3 (FinOps Open Cost and Usage Specification), Cost and Usage
dataset: one charge per (cluster, team, product, model, pricing) line of a billing month.

Each line is a split-cost allocation of the metered device charges (FOCUS 1.3 split cost
allocation): AllocatedMethodDetails lists, per origin device, the line's AllocatedRatio of that
device's charge; for every device the ratios over all lines add up to exactly 1. Idle, untagged
and host cost are lines of their own. Amounts are in cents by the largest-remainder method, so
the lines add up exactly to the rounded period total.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from runtime.errors import ConfigError
from streams.allocation import split_exact
from streams.reports.limits import MAX_RESULT_ROWS, MAX_SOURCE_ROWS, query_bounded
from streams.reports.money import largest_remainder_cents, ratio, round_total
from streams.reports.params import Period, check_period, format_ms
from streams.reports.render import Tabular, display, money
from streams.reports.sources import cost_source, read_plan, token_source
from streams.rows import KIND_HOST, KIND_IDLE, UNKNOWN, UNTAGGED
from streams.store import ClickHouseStore

FOCUS_VERSION = "1.3"
RATIO_PLACES = 12
_RATIO_QUANTUM = Decimal(1).scaleb(-RATIO_PLACES)
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
PRICING_CATEGORY = {
    "on_demand": "Standard",
    "spot": "Dynamic",
    "reserved": "Committed",
    "custom": "Other",
}
GPU_HOURS = "GPU-Hours"
_TOO_BIG = (
    "a billing month is the shortest period an export covers, so this month is too large to export"
)


@dataclass(frozen=True, slots=True)
class ChargebackSettings:
    """Who bills whom: the fixed FOCUS columns of every charge."""

    billing_account_id: str = "gpuledger"
    billing_account_name: str = "Shared GPU inference platform"
    currency: str = "USD"
    service_name: str = "GPU inference platform"
    service_provider_name: str = "Internal GPU platform"
    host_provider_name: str = "Self-hosted"
    invoice_issuer_name: str = "Internal GPU platform"
    share_policy: str = "dominant"
    idle_policy: str = "platform"

    @property
    def allocated_method_id(self) -> str:
        return f"gpuledger-{self.share_policy}-share-{self.idle_policy}-idle"


@dataclass
class _Line:
    cost: Decimal = _ZERO
    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    by_device: dict[str, list[Any]] = field(default_factory=dict)  # device -> [cost, secs]

    def add(self, device: str, cost: Decimal, seconds: float) -> None:
        self.cost += cost
        self.seconds += seconds
        slot = self.by_device.setdefault(device, [_ZERO, 0.0])
        slot[0] += cost
        slot[1] += seconds


# (cluster, team, product, model, pricing, cost kind)
LineKey = tuple[str, str, str, str, str, str]


@dataclass(frozen=True, slots=True)
class CostPart:
    """Cost of one (pod, labels) on one device and pricing over the period."""

    cluster: str
    pod_uid: str
    device_uuid: str
    team: str
    product: str
    pricing: str
    kind: str
    cost_usd: Decimal
    device_seconds: float


@dataclass(frozen=True, slots=True)
class ModelPart:
    """What a (pod, labels) spent on one model over the period, from cost-per-token rows."""

    pod_uid: str
    team: str
    product: str
    model: str
    cost_usd: Decimal
    prompt_tokens: int
    completion_tokens: int
    requests: int


def cost_kind(kind: str, team: str, product: str) -> str:
    if kind == KIND_IDLE:
        return "idle"
    if kind == KIND_HOST:
        return "host"
    if {team, product} & {UNTAGGED, UNKNOWN}:
        return "untagged"
    return "allocated"


def build_lines(
    cost_parts: Sequence[CostPart], model_parts: Sequence[ModelPart]
) -> tuple[dict[LineKey, _Line], dict[str, Decimal]]:
    """Pure: lines of the export and each device's total charge. A pod's cost on each device
    goes to its models in proportion to what the cost-per-token rows assign each model (exact
    1e-15 quanta); what no model claims stays on the line with no model."""
    device_total: dict[str, Decimal] = {}
    groups: dict[tuple[str, str, str], list[CostPart]] = {}
    lines: dict[LineKey, _Line] = {}
    for part in cost_parts:
        device_total[part.device_uuid] = device_total.get(part.device_uuid, _ZERO) + part.cost_usd
        if part.kind in (KIND_IDLE, KIND_HOST):
            key = (
                part.cluster,
                part.team,
                part.product,
                "",
                part.pricing,
                cost_kind(part.kind, part.team, part.product),
            )
            lines.setdefault(key, _Line()).add(part.device_uuid, part.cost_usd, part.device_seconds)
        else:
            groups.setdefault((part.pod_uid, part.team, part.product), []).append(part)
    models: dict[tuple[str, str, str], list[ModelPart]] = {}
    for m in model_parts:
        models.setdefault((m.pod_uid, m.team, m.product), []).append(m)
    for group_key, parts in groups.items():
        weights = [(str(i), p.cost_usd) for i, p in enumerate(parts)]
        claimed = [_ZERO] * len(parts)
        biggest = max(range(len(parts)), key=lambda i: parts[i].cost_usd)
        for m in sorted(models.get(group_key, []), key=lambda m: m.model):
            shares = split_exact(m.cost_usd, weights) if m.cost_usd > 0 else {}
            for i, part in enumerate(parts):
                share = shares.get(str(i), _ZERO)
                claimed[i] += share
                secs = part.device_seconds * float(share / part.cost_usd) if part.cost_usd else 0.0
                line = lines.setdefault(_key(part, m.model), _Line())
                line.add(part.device_uuid, share, secs)
            tokens_line = lines[_key(parts[biggest], m.model)]
            tokens_line.prompt_tokens += m.prompt_tokens
            tokens_line.completion_tokens += m.completion_tokens
            tokens_line.requests += m.requests
        for i, part in enumerate(parts):
            rest = part.cost_usd - claimed[i]
            share_secs = (
                part.device_seconds * float(rest / part.cost_usd)
                if part.cost_usd
                else (part.device_seconds)
            )
            if rest != 0 or share_secs > 0 or not models.get(group_key):
                lines.setdefault(_key(part, ""), _Line()).add(part.device_uuid, rest, share_secs)
    return lines, device_total


def _key(part: CostPart, model: str) -> LineKey:
    return (
        part.cluster,
        part.team,
        part.product,
        model,
        part.pricing,
        cost_kind(part.kind, part.team, part.product),
    )


def device_ratios(
    lines: dict[LineKey, _Line], device_total: dict[str, Decimal]
) -> dict[LineKey, dict[str, Decimal]]:
    """AllocatedRatio of each line on each device, in 1e-12 steps, adding up to exactly 1 per
    device (largest remainder)."""
    out: dict[LineKey, dict[str, Decimal]] = {k: {} for k in lines}
    per_device: dict[str, list[tuple[LineKey, Decimal]]] = {}
    for key, line in lines.items():
        for device, (cost, _) in line.by_device.items():
            per_device.setdefault(device, []).append((key, cost))
    for device, entries in per_device.items():
        total = device_total.get(device, _ZERO)
        if total <= 0:
            continue
        exact = [(k, c / total) for k, c in entries]
        floors = [(k, r.quantize(_RATIO_QUANTUM, ROUND_FLOOR)) for k, r in exact]
        left = int((Decimal(1) - sum((f for _, f in floors), _ZERO)) / _RATIO_QUANTUM)
        order = sorted(range(len(exact)), key=lambda i: (-(exact[i][1] - floors[i][1]), i))
        values = [f for _, f in floors]
        for n in range(max(0, left)):
            values[order[n % len(order)]] += _RATIO_QUANTUM
        for (key, _), value in zip(floors, values, strict=True):
            out[key][device] = value
    return out


@dataclass(frozen=True, slots=True)
class ChargebackExport:
    period: Period
    settings: ChargebackSettings
    rows: tuple[dict[str, Any], ...]  # FOCUS columns, in order
    total_usd: Decimal
    total_cents_usd: Decimal

    def table(self) -> Sequence[Tabular]:
        rows = tuple(
            (
                display(r["x_Team"]),
                display(r["x_Product"]),
                display(r["x_Model"] or ""),
                r["x_Pricing"],
                r["x_CostKind"],
                money(r["BilledCost"]),
                f"{r['ConsumedQuantity']:.2f}",
            )
            for r in self.rows
        )
        return (
            Tabular(
                f"Chargeback (FOCUS {FOCUS_VERSION}), {format_ms(self.period.start_ms)[:7]}",
                ("team", "product", "model", "pricing", "kind", "BilledCost", "GPU-hours"),
                rows,
                (("total", "", "", "", "", money(self.total_cents_usd), ""),),
                right_aligned_from=5,
            ),
        )

    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "focus_version": FOCUS_VERSION,
            "dataset": "CostAndUsage",
            "billing_period_start": format_ms(self.period.start_ms),
            "billing_period_end": format_ms(self.period.end_ms),
            "total_billed_cost": self.total_cents_usd,
            "rows": self.records(),
        }


def chargeback(
    store: ClickHouseStore,
    period: Period,
    settings: ChargebackSettings | None = None,
    *,
    use_rollups: bool = True,
) -> ChargebackExport:
    settings = settings or ChargebackSettings()
    check_period(period)
    month = format_ms(period.start_ms)[:7]
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    costs = cost_source(store.database, plan)
    tokens = token_source(store.database, plan)
    cost_parts = [
        CostPart(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], float(r[8]))
        for r in query_bounded(
            store,
            f"SELECT cluster, pod_uid, device_uuid, team, product, pricing, kind, sum(cost_usd), "
            f"sum(device_seconds) FROM {costs} "
            f"GROUP BY cluster, pod_uid, device_uuid, team, product, pricing, kind",
            limit=MAX_SOURCE_ROWS,
            what=f"the chargeback of {month} (one row per pod, device, labels and pricing)",
            narrow=_TOO_BIG,
        )
    ]
    model_parts = [
        ModelPart(r[0], r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), int(r[7]))
        for r in query_bounded(
            store,
            f"SELECT pod_uid, team, product, model, sum(cost_usd), sum(prompt_tokens), "
            f"sum(completion_tokens), sum(requests) FROM {tokens} "
            f"GROUP BY pod_uid, team, product, model",
            limit=MAX_SOURCE_ROWS,
            what=f"the chargeback of {month} (one row per pod, labels and model)",
            narrow=_TOO_BIG,
        )
    ]
    return build_export(period, settings, cost_parts, model_parts)


def build_export(
    period: Period,
    settings: ChargebackSettings,
    cost_parts: Sequence[CostPart],
    model_parts: Sequence[ModelPart],
) -> ChargebackExport:
    lines, device_total = build_lines(cost_parts, model_parts)
    if len(lines) > MAX_RESULT_ROWS:
        raise ConfigError(
            f"the chargeback of {format_ms(period.start_ms)[:7]} has {len(lines):,} charges, "
            f"more than the {MAX_RESULT_ROWS:,} rows one export returns; {_TOO_BIG}"
        )
    order = {"allocated": 0, "untagged": 1, "host": 2, "idle": 3}
    keys = sorted(lines, key=lambda k: (order[k[5]], k[0], k[1], k[2], k[3], k[4]))
    cents = largest_remainder_cents([lines[k].cost for k in keys])
    ratios = device_ratios(lines, device_total)
    rows = tuple(
        focus_row(period, settings, key, lines[key], cent, ratios[key])
        for key, cent in zip(keys, cents, strict=True)
    )
    total = sum((lines[k].cost for k in keys), _ZERO)
    return ChargebackExport(period, settings, rows, total, round_total(total))


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def focus_row(
    period: Period,
    settings: ChargebackSettings,
    key: LineKey,
    line: _Line,
    cents: Decimal,
    ratios: dict[str, Decimal],
) -> dict[str, Any]:
    cluster, team, product, model, pricing, kind = key
    hours = Decimal(repr(line.seconds)) / 3600
    quantity = hours.quantize(Decimal("1e-9"))
    unit_price = ratio(line.cost, hours, 9) if quantity > 0 else None
    start, end = format_ms(period.start_ms), format_ms(period.end_ms)
    elements = [
        {
            "AllocatedRatio": _RatioNumber(ratios[device]),
            "UsageUnit": GPU_HOURS,
            "UsageQuantity": _RatioNumber((Decimal(repr(secs)) / 3600).quantize(Decimal("1e-9"))),
            "x_OriginResourceId": device,
        }
        for device, (_, secs) in sorted(line.by_device.items())
        if device in ratios
    ]
    allocated = kind != "idle"  # idle is the unallocated portion of the device charges
    tags = {"team": team, "product": product}
    allocated_tags = {k: v for k, v in tags.items() if v not in (UNTAGGED, UNKNOWN)}
    if model:
        allocated_tags["gpuledger/model"] = model
    if kind == "idle":
        description = f"Idle GPU time, unallocated ({pricing})"
    elif kind == "host":
        description = f"GPU time of host processes outside any pod ({pricing})"
    else:
        who = f"team {display(team)}, product {display(product)}"
        description = (
            f"GPU time of {who}" + (f" serving {model}" if model else "") + (f" ({pricing})")
        )
    tokens = line.prompt_tokens + line.completion_tokens
    return {
        "BillingAccountId": settings.billing_account_id,
        "BillingAccountName": settings.billing_account_name,
        "BillingCurrency": settings.currency,
        "BillingPeriodStart": start,
        "BillingPeriodEnd": end,
        "ChargePeriodStart": start,
        "ChargePeriodEnd": end,
        "ChargeCategory": "Usage",
        "ChargeClass": None,
        "ChargeDescription": description,
        "ChargeFrequency": "Usage-Based",
        "BilledCost": cents,
        "EffectiveCost": cents,
        "ListCost": cents,
        "ContractedCost": cents,
        "ListUnitPrice": unit_price,
        "ContractedUnitPrice": unit_price,
        "PricingCategory": PRICING_CATEGORY.get(pricing, "Other"),
        "PricingQuantity": quantity,
        "PricingUnit": GPU_HOURS,
        "ConsumedQuantity": quantity,
        "ConsumedUnit": GPU_HOURS,
        "ServiceCategory": "AI and Machine Learning",
        "ServiceSubcategory": "Generative AI",
        "ServiceName": settings.service_name,
        "ServiceProviderName": settings.service_provider_name,
        "HostProviderName": settings.host_provider_name,
        "InvoiceIssuerName": settings.invoice_issuer_name,
        "ProviderName": settings.service_provider_name,
        "PublisherName": settings.service_provider_name,
        "ResourceId": f"gpuledger/{cluster}/gpu-pool/{pricing}",
        "ResourceName": f"{cluster} GPU pool ({pricing})",
        "ResourceType": "GPU pool",
        "Tags": _json({"gpuledger/cluster": cluster, "gpuledger/pricing": pricing}),
        "AllocatedMethodId": settings.allocated_method_id,
        "AllocatedMethodDetails": _details_json(elements),
        "AllocatedResourceId": f"{team}/{product}/{model or '-'}" if allocated else None,
        "AllocatedResourceName": (
            f"{display(team)} / {display(product)}" + (f" / {model}" if model else "")
            if allocated
            else None
        ),
        "AllocatedTags": _json(allocated_tags) if allocated else None,
        "x_Cluster": cluster,
        "x_Team": team,
        "x_Product": product,
        "x_Model": model or None,
        "x_Pricing": pricing,
        "x_CostKind": kind,
        "x_PromptTokens": line.prompt_tokens,
        "x_CompletionTokens": line.completion_tokens,
        "x_Requests": line.requests,
        "x_CostPer1MTokens": ratio(line.cost * _MILLION, Decimal(tokens), 6) if tokens else None,
        "x_UnroundedCost": line.cost,
    }


class _RatioNumber:
    """A Decimal written as a JSON number, exactly as it is."""

    def __init__(self, value: Decimal) -> None:
        self.text = format(value.normalize(), "f") if value else "0"


def _details_json(elements: list[dict[str, Any]]) -> str:
    def encode(value: Any) -> str:
        if isinstance(value, _RatioNumber):
            return value.text
        if isinstance(value, dict):
            return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list):
            return "[" + ",".join(encode(v) for v in value) + "]"
        return json.dumps(value, ensure_ascii=False)

    return encode({"Elements": elements})
