"""Cost allocation (design §3) as pure functions.

Each GPU sample is priced (`Pricer`) and folded, when it arrives, into the per-owner sums of its
(window, device) (`DeviceWindow.add_sample`); the sums do not depend on arrival order; when the
window closes they become rows (`finalize_device_window`). Money is counted in whole femto-USD
(1e-15) per sample part, so every later sum is exact and independent of arrival order: per
window, the rows add up to the sample costs exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from functools import partial
from typing import Protocol

from schemas.events import GpuSample, PodInfo, ProcessSample
from streams.labels import LabelSettings, resolve_owner
from streams.pricing import PriceBook, Quote, device_price_per_hour
from streams.rows import HOST, IDLE, KIND_HOST, KIND_IDLE, KIND_USAGE, CostRow

MONEY_QUANTUM = Decimal("1e-15")
_ZERO = Decimal(0)
_SECONDS_PER_HOUR = Decimal(3600)

SHARE_POLICIES = ("dominant", "memory", "sm", "weighted")
IDLE_POLICIES = ("platform", "proportional", "even")


@dataclass(frozen=True, slots=True)
class AllocationSettings:
    share_policy: str = "dominant"
    sm_weight: float = 0.5  # `weighted` policy: w*u + (1-w)*m
    idle_policy: str = "platform"
    window_s: int = 60
    labels: LabelSettings = field(default_factory=LabelSettings)

    def __post_init__(self) -> None:
        if self.share_policy not in SHARE_POLICIES:
            raise ValueError(f"share policy must be one of {', '.join(SHARE_POLICIES)}")
        if self.idle_policy not in IDLE_POLICIES:
            raise ValueError(f"idle policy must be one of {', '.join(IDLE_POLICIES)}")
        if not 0.0 <= self.sm_weight <= 1.0:
            raise ValueError("sm_weight must be between 0 and 1")
        if self.window_s <= 0:
            raise ValueError("window_s must be positive")


def process_shares(
    processes: Iterable[ProcessSample], mem_total_bytes: int, settings: AllocationSettings
) -> list[float]:
    """Each process's share a_i of the device (steps 3 and 4): normalised when they sum > 1.

    m (memory) and u (SM) are clamped to [0, 1]; this runs for every sample, so it is written
    out without helper calls."""
    policy = settings.share_policy
    w = settings.sm_weight
    shares = []
    total = 0.0
    for p in processes:
        m = p.mem_used_bytes / mem_total_bytes
        m = 0.0 if m < 0.0 else 1.0 if m > 1.0 else m
        u = (p.sm_util_pct or 0.0) / 100.0
        u = 0.0 if u < 0.0 else 1.0 if u > 1.0 else u
        if policy == "dominant":
            a = m if m > u else u
        elif policy == "memory":
            a = m
        elif policy == "sm":
            a = u
        else:
            a = w * u + (1.0 - w) * m
        shares.append(a)
        total += a
    if total > 1.0:
        shares = [a / total for a in shares]
    return shares


def sample_cost_usd(price_per_hour_usd: Decimal, interval_s: float) -> Decimal:
    """Step 2: c = p * dt / 3600, quantised to 1e-15 USD."""
    cost = price_per_hour_usd * Decimal(repr(interval_s)) / _SECONDS_PER_HOUR
    return cost.quantize(MONEY_QUANTUM, ROUND_HALF_EVEN)


FEMTO_PER_USD = 10**15
NANOS_PER_SECOND = 10**9
MICROS = 10**6

# Positions in an owner's totals: [femto-USD, nanoseconds, micro(percent x seconds), byte-seconds]
COST, DEVICE_NS, SM_PCT_US, MEM_BYTE_SECONDS = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class DevicePrice:
    """What one device costs per hour at an event time, and where that price came from."""

    price_per_hour_usd: Decimal  # of this device (MIG share applied)
    pricing: str
    known_model: bool


def _device_price(quote: Quote, sample: GpuSample) -> DevicePrice:
    price = device_price_per_hour(quote.price_per_hour_usd, sample.mig_slices, sample.gpu_slices)
    return DevicePrice(price, quote.pricing, quote.known_model)


class _Known:
    """One remembered device price, the event-time span it holds for, and sample costs at it
    by interval (agents sample on a steady period: few distinct intervals per price)."""

    __slots__ = ("costs", "price", "valid_from_ms", "valid_until_ms")

    def __init__(self, price: DevicePrice, valid_from_ms: int, valid_until_ms: int) -> None:
        self.price = price
        self.valid_from_ms = valid_from_ms
        self.valid_until_ms = valid_until_ms
        self.costs: dict[float, int] = {}


class Pricer:
    """`price_device` and `sample_cost_fusd`, remembered per (model, pricing class, MIG
    slices, GPU slices) for the span of event time over which the book says the price holds."""

    __slots__ = ("_known", "book")

    MAX_INTERVALS = 10_000  # remembered costs per price
    MAX_PRICES = 10_000  # remembered prices: models and classes come from the input

    def __init__(self, book: PriceBook) -> None:
        self.book = book
        self._known: dict[tuple[str, str, int | None, int], _Known] = {}

    def price(self, sample: GpuSample, time_ms: int) -> tuple[DevicePrice, int]:
        """The device's price and this sample's cost in femto-USD."""
        pricing = self.book.pricing_class(sample.node_labels)
        key = (sample.gpu_model, pricing, sample.mig_slices, sample.gpu_slices)
        known = self._known.get(key)
        if known is None or not known.valid_from_ms <= time_ms < known.valid_until_ms:
            quote, valid_from, valid_until = self.book.quote_span(
                sample.gpu_model, pricing, time_ms
            )
            if known is None and len(self._known) >= self.MAX_PRICES:
                self._known.clear()
            known = self._known[key] = _Known(_device_price(quote, sample), valid_from, valid_until)
        interval_s = sample.interval_s
        cost = known.costs.get(interval_s)
        if cost is None:
            if len(known.costs) >= self.MAX_INTERVALS:
                known.costs.clear()
            cost = known.costs[interval_s] = sample_cost_fusd(known.price, interval_s)
        return known.price, cost


def owner_parts(
    sample: GpuSample, cost_fusd: int, interval_ns: int, settings: AllocationSettings
) -> tuple[dict[str, list[int]], int]:
    """Steps 3-6 for one priced sample: each owner's part (see COST..MEM_BYTE_SECONDS) and the
    idle femto-USD. Each process's cost is rounded once to a whole femto-dollar and the idle
    part is what is left, so the parts add up to the sample cost exactly."""
    dt = sample.interval_s
    processes = sample.processes
    shares = process_shares(processes, sample.mem_total_bytes, settings)
    grouped: dict[str, list[int]] = {}
    allocated = 0
    for proc, share in zip(processes, shares, strict=True):
        cost = round(cost_fusd * share)
        allocated += cost
        ns = round(interval_ns * share)
        sm = round(dt * (proc.sm_util_pct or 0.0) * MICROS)
        mem = round(proc.mem_used_bytes * dt)
        owner = proc.pod_uid or HOST
        part = grouped.get(owner)
        if part is None:
            grouped[owner] = [cost, ns, sm, mem]
        else:
            part[COST] += cost
            part[DEVICE_NS] += ns
            part[SM_PCT_US] += sm
            part[MEM_BYTE_SECONDS] += mem
    if allocated > cost_fusd:
        # Rounding of normalised shares can overshoot by a few quanta: take it from the largest.
        largest = max(grouped, key=lambda o: (grouped[o][COST], o))
        grouped[largest][COST] -= allocated - cost_fusd
        allocated = cost_fusd
    return grouped, cost_fusd - allocated


def sample_cost_fusd(price: DevicePrice, interval_s: float) -> int:
    """Step 2 in femto-USD: exact, as `sample_cost_usd` is."""
    return int(sample_cost_usd(price.price_per_hour_usd, interval_s).scaleb(15))


class DeviceDescription(Protocol):
    """What a row says of its device: a `GpuSample`, or `DeviceAttributes` once packed."""

    @property
    def cluster(self) -> str: ...
    @property
    def node(self) -> str: ...
    @property
    def device_uuid(self) -> str: ...
    @property
    def gpu_uuid(self) -> str: ...
    @property
    def gpu_model(self) -> str: ...
    @property
    def mig_profile(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class DeviceAttributes:
    cluster: str
    node: str
    device_uuid: str
    gpu_uuid: str
    gpu_model: str
    mig_profile: str | None


def id_digest(event_id: str) -> int:
    """A stable 64-bit digest of an event id: what a packed window keeps to refuse a duplicate
    (8 bytes instead of the id; two distinct ids of one (window, device) share a digest with
    probability about n^2 / 2^65)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest())


class DeviceWindow:
    """Sums of the sample parts of one (window, device); the result is order independent.

    `owners` maps each owner to its totals, indexed by COST..MEM_BYTE_SECONDS. The first
    sample (by event time, then id) supplies the rows' device attributes and price. Sample ids
    are kept as strings while the window is live; a window restored from its packed form
    (streams.window_state) knows its earlier samples by `known_digests` (`id_digest`)."""

    __slots__ = (
        "cost_fusd",
        "first_key",
        "first_price",
        "first_sample",
        "idle_fusd",
        "interval_ns",
        "known_count",
        "known_digests",
        "mem_byte_seconds",
        "owners",
        "sample_ids",
        "sm_pct_us",
        "window_start_ms",
    )

    def __init__(self, window_start_ms: int) -> None:
        self.window_start_ms = window_start_ms
        self.sample_ids: set[str] = set()
        self.known_digests: frozenset[int] = frozenset()
        self.known_count = 0  # samples behind `known_digests` (digests may repeat)
        self.cost_fusd = 0
        self.idle_fusd = 0
        self.interval_ns = 0
        self.sm_pct_us = 0
        self.mem_byte_seconds = 0
        self.owners: dict[str, list[int]] = {}
        self.first_key: tuple[int, str] | None = None
        self.first_sample: DeviceDescription | None = None
        self.first_price: DevicePrice | None = None

    def add_sample(
        self,
        event_id: str,
        time_ms: int,
        sample: GpuSample,
        price: DevicePrice,
        cost: int,
        settings: AllocationSettings,
    ) -> bool:
        """Steps 3-6 for one sample of `cost` femto-USD (`Pricer.price`): split it among its
        owners and fold the parts in; False (and no change) for a duplicate event id."""
        if event_id in self.sample_ids or (
            self.known_digests and id_digest(event_id) in self.known_digests
        ):
            return False
        interval_ns = round(sample.interval_s * NANOS_PER_SECOND)
        grouped, idle = owner_parts(sample, cost, interval_ns, settings)
        self._fold(event_id, time_ms, sample, price, cost, interval_ns, grouped, idle)
        return True

    def _fold(
        self,
        event_id: str,
        time_ms: int,
        sample: GpuSample,
        price: DevicePrice,
        cost_fusd: int,
        interval_ns: int,
        grouped: dict[str, list[int]],
        idle_fusd: int,
    ) -> None:
        self.sample_ids.add(event_id)
        dt = sample.interval_s
        self.cost_fusd += cost_fusd
        self.idle_fusd += idle_fusd
        self.interval_ns += interval_ns
        self.sm_pct_us += round(dt * (sample.sm_util_pct or 0.0) * MICROS)
        self.mem_byte_seconds += round(sample.mem_used_bytes * dt)
        owners = self.owners
        for owner, part in grouped.items():
            totals = owners.get(owner)
            if totals is None:
                owners[owner] = part
            else:
                totals[COST] += part[COST]
                totals[DEVICE_NS] += part[DEVICE_NS]
                totals[SM_PCT_US] += part[SM_PCT_US]
                totals[MEM_BYTE_SECONDS] += part[MEM_BYTE_SECONDS]
        # The first sample by (event time, id) describes the device in the rows and gives their
        # price: order independent, and set once per window when samples arrive in time order
        # (nothing of it is read again per sample).
        first = self.first_key
        if first is None or time_ms < first[0] or (time_ms == first[0] and event_id < first[1]):
            self.first_key = (time_ms, event_id)
            self.first_sample = sample
            self.first_price = price

    @property
    def sample_count(self) -> int:
        return len(self.sample_ids) + self.known_count


Folder = Callable[[DeviceWindow, str, int, GpuSample, DevicePrice, int], bool]


def sample_folder(settings: AllocationSettings) -> Folder:
    """`DeviceWindow.add_sample` with `settings` bound, as `fold(window, event_id, time_ms,
    sample, price, cost_fusd)`."""
    return partial(DeviceWindow.add_sample, settings=settings)


def usd(fusd: int) -> Decimal:
    """Femto-USD as an exact Decimal of USD with 15 decimals."""
    return Decimal(fusd).scaleb(-15)


PodLookup = Callable[[str], PodInfo | None]


def finalize_device_window(
    window: DeviceWindow, pod_lookup: PodLookup, settings: AllocationSettings, version: int
) -> list[CostRow]:
    """Rows of one closed (window, device): one per owner plus the idle row (always present,
    possibly at zero cost, so a correction can overwrite an earlier idle amount)."""
    s, price = window.first_sample, window.first_price
    if s is None or price is None:
        return []
    interval_ns = window.interval_ns
    start = window.window_start_ms
    end = start + settings.window_s * 1000

    def per_second(total: int, units_per_one: int) -> float:
        """A time-weighted average: `total` in units x seconds, over the metered seconds."""
        return total * NANOS_PER_SECOND / units_per_one / interval_ns if interval_ns else 0.0

    def row(kind: str, owner: str, labels: tuple[str, str, str, str, str], **kw: object) -> CostRow:
        namespace, pod, team, product, cost_center = labels
        return CostRow(
            window_start_ms=start,
            window_end_ms=end,
            cluster=s.cluster,
            node=s.node,
            device_uuid=s.device_uuid,
            gpu_uuid=s.gpu_uuid,
            gpu_model=s.gpu_model,
            mig_profile=s.mig_profile or "",
            namespace=namespace,
            pod=pod,
            pod_uid=owner,
            team=team,
            product=product,
            cost_center=cost_center,
            kind=kind,
            price_per_hour=price.price_per_hour_usd.quantize(MONEY_QUANTUM),
            pricing=price.pricing,
            version=version,
            **kw,  # type: ignore[arg-type]
        )

    owners = sorted(window.owners.items())
    idle_shares = _spread_idle(
        usd(window.idle_fusd), [(o, usd(t[COST])) for o, t in owners if o != HOST], settings
    )
    rows = []
    for owner, totals in owners:
        extra = idle_shares.get(owner, _ZERO)
        kind = KIND_HOST if owner == HOST else KIND_USAGE
        rows.append(
            row(
                kind,
                owner,
                resolve_owner(owner, pod_lookup, settings.labels),
                device_seconds=totals[DEVICE_NS] / NANOS_PER_SECOND,
                sm_util_avg=per_second(totals[SM_PCT_US], MICROS),
                mem_bytes_avg=per_second(totals[MEM_BYTE_SECONDS], 1),
                cost_usd=usd(totals[COST]) + extra,
                idle_cost_usd=extra,
            )
        )
    idle_left = usd(window.idle_fusd) - sum(idle_shares.values(), _ZERO)
    used_ns = sum(t[DEVICE_NS] for t in window.owners.values())
    rows.append(
        row(
            KIND_IDLE,
            IDLE,
            resolve_owner(IDLE, pod_lookup, settings.labels),
            device_seconds=max(interval_ns - used_ns, 0) / NANOS_PER_SECOND,
            sm_util_avg=per_second(window.sm_pct_us, MICROS),
            mem_bytes_avg=per_second(window.mem_byte_seconds, 1),
            cost_usd=idle_left,
            idle_cost_usd=idle_left,
        )
    )
    return rows


def _spread_idle(
    idle_usd: Decimal, pods: list[tuple[str, Decimal]], settings: AllocationSettings
) -> dict[str, Decimal]:
    """Step 8: the idle share each pod takes; empty for the `platform` policy."""
    if settings.idle_policy == "platform" or not pods or idle_usd <= 0:
        return {}
    if settings.idle_policy == "even":
        weights = [(owner, Decimal(1)) for owner, _ in pods]
    else:
        weights = [(owner, cost) for owner, cost in pods if cost > 0]
    return split_exact(idle_usd, weights)


def split_exact(amount: Decimal, weights: list[tuple[str, Decimal]]) -> dict[str, Decimal]:
    """Split `amount` by weights into 1e-15 quanta that add up exactly (largest remainder)."""
    total = sum((w for _, w in weights), _ZERO)
    if total <= 0:
        return {}
    parts: dict[str, Decimal] = {}
    remainders = []
    for owner, weight in weights:
        exact = amount * weight / total
        floor = exact.quantize(MONEY_QUANTUM, ROUND_FLOOR)
        parts[owner] = floor
        remainders.append((exact - floor, owner))
    left = int((amount - sum(parts.values(), _ZERO)) / MONEY_QUANTUM)
    for _, owner in sorted(remainders, key=lambda r: (-r[0], r[1]))[:left]:
        parts[owner] += MONEY_QUANTUM
    return parts
