"""Origin charges and their allocated parts: FOCUS 1.3 split cost allocation, exact.

An **origin charge** is one device (a whole GPU or a MIG instance) for one hour at one price:
PricingQuantity is the device-hours the meter saw, ListUnitPrice the price-book rate it applied
(MIG share included), and its cost is rate x quantity. Its **allocated charges** are one per
owner that used the device in that hour — team, product, cost centre and the model its pods
served — plus the host processes, the untagged pods and the idle time, each as a part of its
own. An allocated charge keeps the origin's unit price; its quantity is its share of the
origin's quantity, in proportion to the metered cost the worker allocated to it, so that

- each charge's cost is exactly unit price x quantity (no rounding anywhere: quantities are
  multiples of `QUANTITY_QUANTUM` and the products are exact decimals),
- the quantities, and so the costs, of the parts add up exactly to the origin's, and
- the AllocatedRatio of the parts (each part's quantity over the origin's, in steps of
  `RATIO_QUANTUM`) adds up to exactly 1 per origin charge (largest remainder).

Pure: the report reads the rows (streams.reports.chargeback) and turns the result into FOCUS
columns (streams.reports.focus_columns).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, localcontext

from streams.allocation import split_exact
from streams.reports.money import WIDE, largest_remainder
from streams.rows import HOST, IDLE, KIND_HOST, KIND_IDLE, UNKNOWN, UNTAGGED

QUANTITY_PLACES = 12  # device-hours: 3.6 ns, finer than the meter's nanosecond device time
QUANTITY_QUANTUM = Decimal(1).scaleb(-QUANTITY_PLACES)
RATIO_PLACES = 15
RATIO_QUANTUM = Decimal(1).scaleb(-RATIO_PLACES)
BILL_QUANTUM = Decimal("1e-15")  # the bill's amounts in the store (Decimal(38, 15))
_ZERO = Decimal(0)
_ONE = Decimal(1)
_SECONDS_PER_HOUR = Decimal(3600)
_NANOSECOND = Decimal("1e-9")
# Products and sums of exact decimals: wide enough never to round, and told to fail if it would.
EXACT = Context(prec=80, traps=[Inexact])

ALLOCATED, UNTAGGED_KIND, HOST_KIND, IDLE_KIND = "allocated", "untagged", "host", "idle"
PLACEHOLDERS = frozenset({UNTAGGED, UNKNOWN, HOST, IDLE})


@dataclass(frozen=True, slots=True)
class HourCost:
    """One row of the hourly cost source: an owner's cost on a device in an hour."""

    hour_ms: int
    cluster: str
    node: str
    device_uuid: str
    gpu_model: str
    mig_profile: str
    pricing: str
    price_per_hour_usd: Decimal
    pod_uid: str
    team: str
    product: str
    cost_center: str
    kind: str
    cost_usd: Decimal
    device_seconds: float


@dataclass(frozen=True, slots=True)
class HourTokens:
    """What a pod's cost-per-token rows of one hour assign to one model."""

    hour_ms: int
    pod_uid: str
    team: str
    product: str
    cost_center: str
    model: str
    cost_usd: Decimal
    prompt_tokens: int
    completion_tokens: int
    requests: int


@dataclass(frozen=True, slots=True)
class OriginCharge:
    hour_ms: int
    cluster: str
    node: str
    device_uuid: str
    gpu_model: str
    mig_profile: str
    pricing: str
    unit_price_usd: Decimal  # per device-hour
    quantity_hours: Decimal
    metered_cost_usd: Decimal  # what the worker's rows add up to

    @property
    def cost_usd(self) -> Decimal:
        return EXACT.multiply(self.unit_price_usd, self.quantity_hours)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who an allocated charge is for. Labels are None where the pod had none (never a
    placeholder); `model` is None for time that served no tokens."""

    kind: str  # allocated | untagged | host | idle
    team: str | None = None
    product: str | None = None
    cost_center: str | None = None
    model: str | None = None

    def sort_key(self) -> tuple[int, str, str, str, str]:
        order = {ALLOCATED: 0, UNTAGGED_KIND: 1, HOST_KIND: 2, IDLE_KIND: 3}[self.kind]
        return (
            order,
            self.team or "",
            self.product or "",
            self.cost_center or "",
            self.model or "",
        )


@dataclass(frozen=True, slots=True)
class AllocatedCharge:
    origin: OriginCharge
    owner: Owner
    quantity_hours: Decimal  # the part of the origin's device-hours charged to the owner
    ratio: Decimal  # AllocatedRatio: the part's share of its origin charge
    used_hours: Decimal  # the owner's own device time (before any idle share)
    metered_cost_usd: Decimal
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    # On the billed basis: the part's share of the bill (EffectiveCost, BilledCost) for its
    # origin charge; None where no imported bill covers the origin (the list basis applies).
    billed_effective: Decimal | None = None
    billed: Decimal | None = None

    @property
    def cost_usd(self) -> Decimal:
        """List cost: the price-book rate x the part's device-hours."""
        return EXACT.multiply(self.origin.unit_price_usd, self.quantity_hours)

    @property
    def effective_cost(self) -> Decimal:
        """What the part costs on its basis: the bill's share where there is one, else list."""
        return self.billed_effective if self.billed_effective is not None else self.cost_usd


OriginKey = tuple[int, str, str, str, Decimal]  # hour, cluster, device, pricing, price


def origin_key(origin: OriginCharge) -> OriginKey:
    return (
        origin.hour_ms,
        origin.cluster,
        origin.device_uuid,
        origin.pricing,
        origin.unit_price_usd,
    )


def with_billed(
    charges: Sequence[AllocatedCharge], billed: Mapping[OriginKey, tuple[Decimal, Decimal]]
) -> list[AllocatedCharge]:
    """The charges with their share of each origin's bill: `billed` holds, per origin, the
    EffectiveCost and BilledCost the true-up gave its metered rows. An origin's bill is split
    over its parts by the same weights as its device-hours (metered cost), in 1e-15 steps by
    largest remainder, so the parts add up to it exactly."""
    out: list[AllocatedCharge] = []
    at = 0
    while at < len(charges):
        origin = charges[at].origin
        end = at
        while end < len(charges) and charges[end].origin is origin:
            end += 1
        parts = charges[at:end]
        amounts = billed.get(origin_key(origin))
        if amounts is None:
            out.extend(parts)
        else:
            weights = [max(p.metered_cost_usd, _ZERO) for p in parts]
            if not any(weights):
                weights = [p.quantity_hours for p in parts]
            effective = largest_remainder(amounts[0], weights, BILL_QUANTUM)
            bill = largest_remainder(amounts[1], weights, BILL_QUANTUM)
            out.extend(
                replace(p, billed_effective=e, billed=b)
                for p, e, b in zip(parts, effective, bill, strict=True)
            )
        at = end
    return out


def real_label(value: str) -> str | None:
    return None if not value or value in PLACEHOLDERS else value


def owner_of(row: HourCost, model: str | None) -> Owner:
    if row.kind == KIND_IDLE:
        return Owner(IDLE_KIND)
    if row.kind == KIND_HOST:
        return Owner(HOST_KIND)
    team, product = real_label(row.team), real_label(row.product)
    kind = ALLOCATED if team is not None and product is not None else UNTAGGED_KIND
    return Owner(kind, team, product, real_label(row.cost_center), model or None)


def nanoseconds(seconds: float) -> Decimal:
    """Seconds as an exact decimal, to the meter's resolution (the worker counts device time in
    whole nanoseconds), so that sums of them never round and do not depend on their order."""
    with localcontext(WIDE):
        return Decimal(repr(seconds)).quantize(_NANOSECOND, ROUND_HALF_EVEN)


def origin_quantity(price: Decimal, metered_cost: Decimal, seconds: Decimal) -> Decimal:
    """Device-hours of an origin charge: the metered cost over the rate (the meter priced each
    sample at rate x its interval), or the metered seconds where the rate is zero."""
    with localcontext(WIDE):
        hours = metered_cost / price if price > 0 else seconds / _SECONDS_PER_HOUR
        return hours.quantize(QUANTITY_QUANTUM, ROUND_HALF_EVEN)


def _model_split(
    rows: Sequence[HourCost], tokens: Sequence[HourTokens]
) -> list[tuple[HourCost, str | None, Decimal, float, tuple[int, int, int]]]:
    """Each pod row's cost split over the models its cost-per-token rows of the hour assign
    cost to (on every device in proportion to the pod's cost there; exact 1e-15 quanta); what
    no model claims stays with no model. Tokens go to the pod's costliest device."""
    by_pod: dict[tuple[str, str, str, str], list[HourCost]] = {}
    out: list[tuple[HourCost, str | None, Decimal, float, tuple[int, int, int]]] = []
    for row in sorted(rows, key=_row_order):
        if row.kind in (KIND_IDLE, KIND_HOST):
            out.append((row, None, row.cost_usd, row.device_seconds, (0, 0, 0)))
        else:
            by_pod.setdefault((row.pod_uid, row.team, row.product, row.cost_center), []).append(row)
    models: dict[tuple[str, str, str, str], list[HourTokens]] = {}
    for t in tokens:
        models.setdefault((t.pod_uid, t.team, t.product, t.cost_center), []).append(t)
    for key, parts in by_pod.items():
        weights = [(str(i), p.cost_usd) for i, p in enumerate(parts)]
        claimed = [_ZERO] * len(parts)
        biggest = max(range(len(parts)), key=lambda i: (parts[i].cost_usd, -i))
        served = sorted(models.get(key, []), key=lambda m: m.model)
        for m, claim in zip(served, _claims(served, parts), strict=True):
            shares = split_exact(claim, weights) if claim > 0 else {}
            for i, part in enumerate(parts):
                share = shares.get(str(i), _ZERO)
                if share == 0 and i != biggest:
                    continue
                claimed[i] += share
                secs = part.device_seconds * float(share / part.cost_usd) if part.cost_usd else 0.0
                counts = (
                    (m.prompt_tokens, m.completion_tokens, m.requests)
                    if i == biggest
                    else (0, 0, 0)
                )
                out.append((part, m.model, share, secs, counts))
        for i, part in enumerate(parts):
            rest = part.cost_usd - claimed[i]
            secs = (
                part.device_seconds * float(rest / part.cost_usd)
                if part.cost_usd
                else (0.0 if models.get(key) else part.device_seconds)
            )
            if rest != 0 or secs > 0 or not models.get(key):
                out.append((part, None, rest, secs, (0, 0, 0)))
    return out


def _claims(served: Sequence[HourTokens], parts: Sequence[HourCost]) -> list[Decimal]:
    """What each model takes of the pod's cost: what its cost-per-token rows say, unless they
    say more than the pod cost in all (rows of a window whose cost was corrected since), then
    the pod's cost in proportion to them."""
    pod_cost = sum((p.cost_usd for p in parts), _ZERO)
    asked = [max(m.cost_usd, _ZERO) for m in served]
    if sum(asked, _ZERO) <= pod_cost:
        return asked
    shares = split_exact(pod_cost, [(str(i), a) for i, a in enumerate(asked)])
    return [shares.get(str(i), _ZERO) for i in range(len(asked))]


def _row_order(row: HourCost) -> tuple[str, str, str, Decimal, str, str, str, str, str]:
    return (
        row.cluster,
        row.device_uuid,
        row.pricing,
        row.price_per_hour_usd,
        row.pod_uid,
        row.kind,
        row.team,
        row.product,
        row.cost_center,
    )


def allocate_hours(
    costs: Iterable[HourCost], tokens: Iterable[HourTokens]
) -> list[AllocatedCharge]:
    """Allocated charges of the origin charges in `costs`, ordered by hour, cluster, device,
    price, then owner. `tokens` are the cost-per-token rows of the same hours."""
    by_hour: dict[int, list[HourCost]] = {}
    for row in costs:
        by_hour.setdefault(row.hour_ms, []).append(row)
    tokens_by_hour: dict[int, list[HourTokens]] = {}
    for t in tokens:
        tokens_by_hour.setdefault(t.hour_ms, []).append(t)
    charges: list[AllocatedCharge] = []
    for hour in sorted(by_hour):
        charges.extend(_allocate_hour(by_hour[hour], tokens_by_hour.get(hour, [])))
    return charges


_OriginKey = tuple[str, str, str, Decimal]  # cluster, device, pricing, price


class _Sums:
    """What one owner's rows of one origin charge add up to."""

    __slots__ = ("completion_tokens", "cost_usd", "prompt_tokens", "requests", "seconds")

    def __init__(self) -> None:
        self.cost_usd = _ZERO
        self.seconds = _ZERO  # exact sums of the floats' decimal values: order independent
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0


def _allocate_hour(rows: list[HourCost], tokens: list[HourTokens]) -> list[AllocatedCharge]:
    groups: dict[_OriginKey, dict[Owner, _Sums]] = {}
    first: dict[_OriginKey, HourCost] = {}
    for row, model, cost, secs, counts in _model_split(rows, tokens):
        key = (row.cluster, row.device_uuid, row.pricing, row.price_per_hour_usd)
        first.setdefault(key, row)
        sums = groups.setdefault(key, {}).setdefault(owner_of(row, model), _Sums())
        sums.cost_usd = EXACT.add(sums.cost_usd, cost)
        sums.seconds = EXACT.add(sums.seconds, nanoseconds(secs))
        sums.prompt_tokens += counts[0]
        sums.completion_tokens += counts[1]
        sums.requests += counts[2]
    out: list[AllocatedCharge] = []
    for key in sorted(groups):
        owners = groups[key]
        row = first[key]
        metered = _ZERO
        for sums in owners.values():
            metered = EXACT.add(metered, sums.cost_usd)
        seconds = _ZERO
        for sums in owners.values():
            seconds = EXACT.add(seconds, sums.seconds)
        quantity = origin_quantity(row.price_per_hour_usd, metered, seconds)
        if quantity == 0 and metered == 0:
            continue  # nothing was metered on this device in this hour
        origin = OriginCharge(
            row.hour_ms,
            row.cluster,
            row.node,
            row.device_uuid,
            row.gpu_model,
            row.mig_profile,
            row.pricing,
            row.price_per_hour_usd,
            quantity,
            metered,
        )
        ordered = sorted(owners, key=Owner.sort_key)
        if metered > 0:
            weights = [max(owners[o].cost_usd, _ZERO) for o in ordered]
        else:
            weights = [max(owners[o].seconds, _ZERO) for o in ordered]
        quantities = largest_remainder(quantity, weights, QUANTITY_QUANTUM)
        ratios = ratio_split(quantities, quantity)
        for owner, q, r in zip(ordered, quantities, ratios, strict=True):
            sums = owners[owner]
            with localcontext(WIDE):
                used = (sums.seconds / _SECONDS_PER_HOUR).quantize(
                    QUANTITY_QUANTUM, ROUND_HALF_EVEN
                )
            out.append(
                AllocatedCharge(
                    origin,
                    owner,
                    q,
                    r,
                    used,
                    sums.cost_usd,
                    sums.prompt_tokens,
                    sums.completion_tokens,
                    sums.requests,
                )
            )
    return out


def ratio_split(quantities: Sequence[Decimal], total: Decimal) -> list[Decimal]:
    """Each quantity's share of `total` in RATIO_QUANTUM steps, adding up to exactly 1."""
    return largest_remainder(_ONE, list(quantities), RATIO_QUANTUM)
