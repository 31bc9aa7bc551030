"""Cost allocation (SPEC section 3) as pure functions.

A GPU sample is split once, when it arrives, into per-owner parts (`split_sample`); the parts of
one (window, device) are summed in any order (`DeviceWindow`); when the window closes the sums
become rows (`finalize_device_window`). Money is Decimal quantised to 1e-15 USD per sample part,
so every later sum is exact and independent of arrival order: per window, the rows add up to the
sample costs exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

from schemas.events import CloudEvent, GpuSample, PodInfo, ProcessSample
from streams.labels import LabelSettings, resolve_owner
from streams.pricing import PriceBook, device_price_per_hour
from streams.rows import HOST, IDLE, KIND_HOST, KIND_IDLE, KIND_USAGE, CostRow
from streams.windows import window_of

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


def _clamp01(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def process_shares(
    processes: Iterable[ProcessSample], mem_total_bytes: int, settings: AllocationSettings
) -> list[float]:
    """Each process's share a_i of the device (steps 3 and 4): normalised when they sum > 1."""
    policy = settings.share_policy
    shares = []
    for p in processes:
        m = _clamp01(p.mem_used_bytes / mem_total_bytes)
        u = _clamp01((p.sm_util_pct or 0.0) / 100.0)
        if policy == "dominant":
            shares.append(max(m, u))
        elif policy == "memory":
            shares.append(m)
        elif policy == "sm":
            shares.append(u)
        else:
            shares.append(settings.sm_weight * u + (1.0 - settings.sm_weight) * m)
    total = sum(shares)
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


@dataclass(frozen=True, slots=True)
class OwnerPart:
    """One owner's (pod uid, or `__host__`) part of one sample, in integer units so that sums
    are exact and cheap: femto-USD, nanoseconds, micro(percent x seconds), byte-seconds."""

    owner: str
    cost_fusd: int
    device_ns: int
    sm_pct_us: int
    mem_byte_seconds: int


@dataclass(frozen=True, slots=True)
class SampleSplit:
    event_id: str
    time_ms: int
    window_start_ms: int
    sample: GpuSample
    price_per_hour_usd: Decimal  # of this device (MIG share applied)
    pricing: str
    known_model: bool
    cost_fusd: int
    idle_fusd: int
    interval_ns: int
    sm_pct_us: int
    mem_byte_seconds: int
    owners: tuple[OwnerPart, ...]


def split_sample(
    event: CloudEvent[GpuSample], book: PriceBook, settings: AllocationSettings
) -> SampleSplit:
    """Steps 1-6 for one sample: price it, share it among processes, group by pod.

    The sample cost is exact (Decimal, quantised to 1e-15 USD); each process's part of it is
    rounded once to a whole femto-dollar, and the idle part is what is left, so the parts add
    up to the sample cost exactly."""
    s = event.data
    pricing = book.pricing_class(s.node_labels)
    quote = book.quote(s.gpu_model, pricing, event.time_ms)
    price = device_price_per_hour(quote.price_per_hour_usd, s.mig_slices, s.gpu_slices)
    cost = int(sample_cost_usd(price, s.interval_s).scaleb(15))
    dt = s.interval_s
    dt_ns = round(dt * NANOS_PER_SECOND)
    shares = process_shares(s.processes, s.mem_total_bytes, settings)

    grouped: dict[str, list[int]] = {}
    for proc, share in zip(s.processes, shares, strict=True):
        owner = proc.pod_uid or HOST
        part = grouped.get(owner)
        if part is None:
            part = grouped[owner] = [0, 0, 0, 0]
        part[0] += round(cost * share)
        part[1] += round(dt_ns * share)
        part[2] += round(dt * (proc.sm_util_pct or 0.0) * MICROS)
        part[3] += round(proc.mem_used_bytes * dt)

    allocated = sum(p[0] for p in grouped.values())
    if allocated > cost:
        # Rounding of normalised shares can overshoot by a few quanta: take it from the largest.
        largest = max(grouped, key=lambda o: (grouped[o][0], o))
        grouped[largest][0] -= allocated - cost
        allocated = cost
    owners = tuple(OwnerPart(o, *v) for o, v in sorted(grouped.items()))
    return SampleSplit(
        event_id=event.id,
        time_ms=event.time_ms,
        window_start_ms=window_of(event.time_ms, settings.window_s),
        sample=s,
        price_per_hour_usd=price,
        pricing=quote.pricing,
        known_model=quote.known_model,
        cost_fusd=cost,
        idle_fusd=cost - allocated,
        interval_ns=dt_ns,
        sm_pct_us=round(dt * (s.sm_util_pct or 0.0) * MICROS),
        mem_byte_seconds=round(s.mem_used_bytes * dt),
        owners=owners,
    )


class _OwnerTotals:
    __slots__ = ("cost_fusd", "device_ns", "mem_byte_seconds", "sm_pct_us")

    def __init__(self) -> None:
        self.cost_fusd = 0
        self.device_ns = 0
        self.sm_pct_us = 0
        self.mem_byte_seconds = 0


class DeviceWindow:
    """Sums of the sample splits of one (window, device); the result is order independent."""

    __slots__ = (
        "cost_fusd",
        "idle_fusd",
        "interval_ns",
        "latest",
        "mem_byte_seconds",
        "owners",
        "sample_ids",
        "sm_pct_us",
        "window_start_ms",
    )

    def __init__(self, window_start_ms: int) -> None:
        self.window_start_ms = window_start_ms
        self.sample_ids: set[str] = set()
        self.cost_fusd = 0
        self.idle_fusd = 0
        self.interval_ns = 0
        self.sm_pct_us = 0
        self.mem_byte_seconds = 0
        self.owners: dict[str, _OwnerTotals] = {}
        self.latest: SampleSplit | None = None

    def add(self, split: SampleSplit) -> bool:
        """Fold one split in; returns False (and changes nothing) for a duplicate event id."""
        if split.event_id in self.sample_ids:
            return False
        self.sample_ids.add(split.event_id)
        self.cost_fusd += split.cost_fusd
        self.idle_fusd += split.idle_fusd
        self.interval_ns += split.interval_ns
        self.sm_pct_us += split.sm_pct_us
        self.mem_byte_seconds += split.mem_byte_seconds
        for part in split.owners:
            totals = self.owners.get(part.owner)
            if totals is None:
                totals = self.owners[part.owner] = _OwnerTotals()
            totals.cost_fusd += part.cost_fusd
            totals.device_ns += part.device_ns
            totals.sm_pct_us += part.sm_pct_us
            totals.mem_byte_seconds += part.mem_byte_seconds
        latest = self.latest
        if latest is None or (split.time_ms, split.event_id) > (latest.time_ms, latest.event_id):
            self.latest = split
        return True

    @property
    def sample_count(self) -> int:
        return len(self.sample_ids)


def usd(fusd: int) -> Decimal:
    """Femto-USD as an exact Decimal of USD with 15 decimals."""
    return Decimal(fusd).scaleb(-15)


PodLookup = Callable[[str], PodInfo | None]


def finalize_device_window(
    window: DeviceWindow, pod_lookup: PodLookup, settings: AllocationSettings, version: int
) -> list[CostRow]:
    """Rows of one closed (window, device): one per owner plus the idle row (always present,
    possibly at zero cost, so a correction can overwrite an earlier idle amount)."""
    latest = window.latest
    if latest is None:
        return []
    s = latest.sample
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
            price_per_hour=latest.price_per_hour_usd.quantize(MONEY_QUANTUM),
            pricing=latest.pricing,
            version=version,
            **kw,  # type: ignore[arg-type]
        )

    owners = sorted(window.owners.items())
    idle_shares = _spread_idle(
        usd(window.idle_fusd), [(o, usd(t.cost_fusd)) for o, t in owners if o != HOST], settings
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
                device_seconds=totals.device_ns / NANOS_PER_SECOND,
                sm_util_avg=per_second(totals.sm_pct_us, MICROS),
                mem_bytes_avg=per_second(totals.mem_byte_seconds, 1),
                cost_usd=usd(totals.cost_fusd) + extra,
                idle_cost_usd=extra,
            )
        )
    idle_left = usd(window.idle_fusd) - sum(idle_shares.values(), _ZERO)
    used_ns = sum(t.device_ns for t in window.owners.values())
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
