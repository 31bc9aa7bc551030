"""Request-based GPU cost, what OpenCost and Kubecost charge: whole devices per request.

In each hour, on each node, the GPU money of the devices a resource names (its *pool*) divided
by the node's capacity of that resource is the price of one unit for the hour; a pod pays count
x unit price x the fraction of the hour it held the request. What no request covers is
`(unrequested)`. Each pool is split exactly (Fractions, then 1e-15 quanta by largest
remainder), so the request-based lines of a node-hour add up to its money to the last quantum.
Requests beyond the capacity are scaled down pro rata: a pool is never charged twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

WHOLE_GPUS = ""  # the device class of whole GPUs: cost rows with mig_profile ''
WHOLE_GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
_QUANTUM_EXPONENT = -15  # Decimal(38, 15): the money of every stored row is a multiple of it
_ZERO = Decimal(0)


def device_class(resource: str) -> str | None:
    """The device class a GPU resource names: WHOLE_GPUS for `nvidia.com/gpu` and
    `nvidia.com/gpu.shared`, the MIG profile for `nvidia.com/mig-<profile>`, None otherwise."""
    if resource in WHOLE_GPU_RESOURCES:
        return WHOLE_GPUS
    if resource.startswith(MIG_RESOURCE_PREFIX) and len(resource) > len(MIG_RESOURCE_PREFIX):
        return resource.removeprefix(MIG_RESOURCE_PREFIX)
    return None


def profile_class(mig_profile: str) -> str:
    """The device class of a cost row's MIG profile as a resource name spells it: NVML's
    `1g.10gb+me` is `nvidia.com/mig-1g.10gb.me` (`+` is not allowed in a resource name)."""
    return mig_profile.replace("+", ".")


@dataclass(frozen=True, slots=True)
class DevicePool:
    """The GPU money of one device class on one node over one span (an hour, or the part of
    it inside the period), and how many distinct devices of the class were metered there."""

    cluster: str
    node: str
    device_class: str
    span_start_ms: int
    span_end_ms: int
    cost_usd: Decimal
    devices_metered: int


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One row of pod_gpu_requests: from `time_ms` on, the pod holds `requests` on `node`
    (empty: nothing). `owner` is the line its cost goes to (its team, product, ...)."""

    cluster: str
    node: str
    pod_uid: str
    owner: str
    requests: tuple[tuple[str, int], ...]
    time_ms: int


@dataclass(frozen=True, slots=True)
class Hold:
    """A pod holding `count` units of `resource` on a node over [start_ms, end_ms)."""

    cluster: str
    node: str
    owner: str
    resource: str
    count: int
    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class CapacityReport:
    """A node's GPU capacity (node_events.gpu_capacity) as reported at `time_ms`."""

    cluster: str
    node: str
    time_ms: int
    capacity: tuple[tuple[str, int], ...]


def holds_from_events(events: Iterable[RequestEvent], until_ms: int) -> list[Hold]:
    """Each event's requests held from its time to the pod's next event (or `until_ms`).
    Events of one pod at the same time keep the order given: the last one wins."""
    by_pod: dict[tuple[str, str], list[RequestEvent]] = {}
    for event in events:
        by_pod.setdefault((event.cluster, event.pod_uid), []).append(event)
    holds: list[Hold] = []
    for pod_events in by_pod.values():
        ordered = sorted(pod_events, key=lambda e: e.time_ms)  # stable: same-time order kept
        ends = [e.time_ms for e in ordered[1:]] + [until_ms]
        for event, end_ms in zip(ordered, ends, strict=True):
            if end_ms <= event.time_ms or not event.node:  # superseded, or not scheduled yet
                continue
            holds.extend(
                Hold(event.cluster, event.node, event.owner, resource, count, event.time_ms, end_ms)
                for resource, count in event.requests
                if count > 0
            )
    return holds


def capacity_at(
    reports: Sequence[CapacityReport], span_start_ms: int, span_end_ms: int
) -> Mapping[str, int] | None:
    """A node's capacity for a span: its latest report at or before the span starts, or, for
    a node first reported during the span, that first report; None without either."""
    before = [r for r in reports if r.time_ms <= span_start_ms]
    if before:
        return dict(max(before, key=lambda r: r.time_ms).capacity)
    during = [r for r in reports if span_start_ms < r.time_ms < span_end_ms]
    if during:
        return dict(min(during, key=lambda r: r.time_ms).capacity)
    return None


def split_exact(total: Decimal, weights: Sequence[Fraction]) -> list[Decimal]:
    """`total` split by non-negative weights (not all zero) into parts that add up to it
    exactly: each part the floor of its exact share in 1e-15 quanta (finer when `total` has
    more places), the quanta left one each to the largest remainders (ties: the earlier)."""
    exponent = min(_QUANTUM_EXPONENT, int(total.as_tuple().exponent))
    quanta = int(total.scaleb(-exponent))
    whole = sum(weights, Fraction(0))
    if whole <= 0:
        raise ValueError("split_exact needs a positive weight")
    exact = [Fraction(quanta) * w / whole for w in weights]
    floors = [e.numerator // e.denominator for e in exact]
    left = quanta - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - floors[i]), i))
    for n in range(left):
        floors[order[n % len(order)]] += 1
    return [Decimal(f).scaleb(exponent) for f in floors]


@dataclass(frozen=True, slots=True)
class PoolSplit:
    """One pool's money: per owner, and the part no request covered."""

    charges_usd: Mapping[str, Decimal]
    unrequested_usd: Decimal
    oversubscribed: tuple[tuple[str, Fraction], ...] = ()  # resource, units held / capacity
    estimated: tuple[str, ...] = ()  # resources priced on the devices metered (no capacity)


def split_pool(
    pool: DevicePool, holds: Sequence[Hold], capacity: Mapping[str, int] | None
) -> PoolSplit:
    """`pool` split over the holds of its node and device class by the requests' share of the
    capacity (count x time held / (capacity x span)). A resource the node reports no capacity
    of is counted in the devices metered there. When the shares add up to more than the whole
    pool (requests beyond capacity), every share is scaled down pro rata."""
    span_ms = pool.span_end_ms - pool.span_start_ms
    owners: list[str] = []
    shares: list[Fraction] = []
    held: dict[str, Fraction] = {}
    estimated: set[str] = set()
    for hold in holds:
        overlap_ms = min(hold.end_ms, pool.span_end_ms) - max(hold.start_ms, pool.span_start_ms)
        if (
            span_ms <= 0
            or overlap_ms <= 0
            or (hold.cluster, hold.node) != (pool.cluster, pool.node)
            or device_class(hold.resource) != pool.device_class
        ):
            continue
        units = (capacity or {}).get(hold.resource, 0)
        if units <= 0:
            units = pool.devices_metered
            estimated.add(hold.resource)
        if units <= 0:
            continue
        share = Fraction(hold.count * overlap_ms, units * span_ms)
        owners.append(hold.owner)
        shares.append(share)
        held[hold.resource] = held.get(hold.resource, Fraction(0)) + share
    requested = sum(shares, Fraction(0))
    if requested == 0:
        return PoolSplit({}, pool.cost_usd, estimated=tuple(sorted(estimated)))
    parts = split_exact(pool.cost_usd, [*shares, max(Fraction(0), 1 - requested)])
    charges: dict[str, Decimal] = {}
    for owner, part in zip(owners, parts, strict=False):
        charges[owner] = charges.get(owner, _ZERO) + part
    over = tuple(sorted(held.items())) if requested > 1 else ()
    return PoolSplit(charges, parts[-1], over, tuple(sorted(estimated)))


@dataclass(frozen=True, slots=True)
class Oversubscription:
    """Pool-hours of one node and resource whose requests exceeded its capacity."""

    cluster: str
    node: str
    resource: str
    spans: int
    peak_ratio: Fraction  # units held / capacity, at the worst span


@dataclass(frozen=True, slots=True)
class RequestAllocation:
    """Request-based cost of many pools: per owner, unrequested, and what was estimated or
    scaled down. `total_usd` is the pools' money: the owners plus unrequested, exactly."""

    by_owner_usd: Mapping[str, Decimal] = field(default_factory=dict)
    unrequested_usd: Decimal = _ZERO
    total_usd: Decimal = _ZERO
    oversubscribed: tuple[Oversubscription, ...] = ()
    estimated: tuple[tuple[str, str, str], ...] = ()  # (cluster, node, resource)
    estimated_spans: int = 0

    def plus(self, other: RequestAllocation) -> RequestAllocation:
        owners = dict(self.by_owner_usd)
        for owner, usd in other.by_owner_usd.items():
            owners[owner] = owners.get(owner, _ZERO) + usd
        over: dict[tuple[str, str, str], Oversubscription] = {}
        for item in (*self.oversubscribed, *other.oversubscribed):
            key = (item.cluster, item.node, item.resource)
            seen = over.get(key)
            over[key] = (
                item
                if seen is None
                else Oversubscription(
                    *key, seen.spans + item.spans, max(seen.peak_ratio, item.peak_ratio)
                )
            )
        return RequestAllocation(
            owners,
            self.unrequested_usd + other.unrequested_usd,
            self.total_usd + other.total_usd,
            tuple(over[k] for k in sorted(over)),
            tuple(sorted({*self.estimated, *other.estimated})),
            self.estimated_spans + other.estimated_spans,
        )


def allocate_requests(
    pools: Iterable[DevicePool],
    holds: Sequence[Hold],
    capacities: Mapping[tuple[str, str], Sequence[CapacityReport]],
) -> RequestAllocation:
    """Every pool split by the holds on its node; `capacities` holds each (cluster, node)'s
    capacity reports."""
    by_node: dict[tuple[str, str], list[Hold]] = {}
    for hold in holds:
        by_node.setdefault((hold.cluster, hold.node), []).append(hold)
    owners: dict[str, Decimal] = {}
    unrequested = total = _ZERO
    over: dict[tuple[str, str, str], Oversubscription] = {}
    estimated: set[tuple[str, str, str]] = set()
    estimated_spans = 0
    for pool in pools:
        node = (pool.cluster, pool.node)
        capacity = capacity_at(capacities.get(node, ()), pool.span_start_ms, pool.span_end_ms)
        split = split_pool(pool, by_node.get(node, []), capacity)
        total += pool.cost_usd
        unrequested += split.unrequested_usd
        for owner, usd in split.charges_usd.items():
            owners[owner] = owners.get(owner, _ZERO) + usd
        for resource, ratio in split.oversubscribed:
            key = (*node, resource)
            seen = over.get(key)
            over[key] = Oversubscription(
                *key,
                (seen.spans if seen else 0) + 1,
                max(ratio, seen.peak_ratio) if seen else ratio,
            )
        estimated.update((*node, resource) for resource in split.estimated)
        estimated_spans += bool(split.estimated)
    return RequestAllocation(
        owners,
        unrequested,
        total,
        tuple(over[k] for k in sorted(over)),
        tuple(sorted(estimated)),
        estimated_spans,
    )
