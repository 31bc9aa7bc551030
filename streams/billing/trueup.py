"""The true-up (pure): each bill charge of a metered GPU node allocated over the metered rows of
that node in the charge's period, by their share of the node's metered cost, exactly.

A charge is the bill lines of one resource (match key) and one charge period, summed. For each:
- the nodes it belongs to are those whose providerID, as of each metered hour, has the charge's
  key (one node, or every instance of an Azure scale set billed as one resource);
- the non-GPU rule takes the GPU part: `whole` gives the users of the GPUs the whole instance;
  `weights` gives them gpus*w_gpu / (gpus*w_gpu + vcpus*w_vcpu + memory_GiB*w_memory) of it (the
  node's capacity), and the rest is a `non_gpu` row of that node;
- the GPU part is split over the metered rows (every kind: usage, host and idle) by metered cost
  (by device-seconds where all cost is zero) in steps of 1e-15 by largest remainder, so the
  parts add up to the charge exactly; BilledCost is split with the same weights;
- a charge with no metered row (or a GPU instance no node has) is `unmetered`: one row per
  hour of its period, in equal parts (largest remainder).
Charges of resources that are neither a known node nor a GPU instance (storage, network, tax)
are not GPU spend and give no row. The result does not depend on the order of its inputs.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import NamedTuple

from streams.billing.lines import AMOUNT_QUANTUM, BillLine
from streams.billing.resources import node_keys
from streams.billing.slices import KIND_NON_GPU, KIND_UNMETERED
from streams.reports.money import WIDE, largest_remainder

HOUR_MS = 3_600_000
_ZERO = Decimal(0)
_GIB = Decimal(1024**3)
NON_GPU_RULES = ("whole", "weights")
# OpenCost's default prices (USD per GPU-hour, vCPU-hour, GiB-hour of memory), which OpenCost
# and Kubecost use to split a node's cost over its resources when the provider gives no split.
DEFAULT_WEIGHTS = (Decimal("0.95"), Decimal("0.031611"), Decimal("0.004237"))


@dataclass(frozen=True, slots=True)
class NonGpuRule:
    """How much of a GPU instance's bill the users of its GPUs pay (module docstring)."""

    mode: str = "whole"
    gpu_weight: Decimal = DEFAULT_WEIGHTS[0]
    vcpu_weight: Decimal = DEFAULT_WEIGHTS[1]
    memory_gib_weight: Decimal = DEFAULT_WEIGHTS[2]

    def __post_init__(self) -> None:
        if self.mode not in NON_GPU_RULES:
            raise ValueError(f"non-GPU rule {self.mode!r} is not one of {', '.join(NON_GPU_RULES)}")
        if min(self.gpu_weight, self.vcpu_weight, self.memory_gib_weight) < 0:
            raise ValueError("non-GPU weights must not be negative")
        if self.gpu_weight <= 0:
            raise ValueError("the GPU weight must be positive")

    def text(self) -> str:
        """The rule as it is recorded with a bill version: `whole`, or `weights:g,v,m`."""
        if self.mode == "whole":
            return "whole"
        weights = (self.gpu_weight, self.vcpu_weight, self.memory_gib_weight)
        return "weights:" + ",".join(format(w.normalize(), "f") for w in weights)

    def gpu_fraction(self, node: NodeIdentity) -> Decimal:
        """The GPU part of the instance, 1 under `whole` or when the capacity is unknown."""
        if self.mode == "whole" or node.gpus <= 0:
            return Decimal(1)
        with localcontext(WIDE):
            gpu = self.gpu_weight * node.gpus
            rest = (
                self.vcpu_weight * Decimal(node.cpu_millicores) / 1000
                + self.memory_gib_weight * Decimal(node.memory_bytes) / _GIB
            )
            return gpu / (gpu + rest)


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What a node event said about a node from `since_ms` on."""

    cluster: str
    node: str
    provider_id: str
    since_ms: int
    instance_type: str = ""
    gpus: int = 0
    cpu_millicores: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True, slots=True)
class MeteredRow:
    """One hourly metered cost row (the dimensions of gpu_cost_hourly)."""

    hour_ms: int
    cluster: str
    node: str
    device_uuid: str
    gpu_model: str
    mig_profile: str
    pricing: str
    price_per_hour: Decimal
    namespace: str
    pod: str
    pod_uid: str
    team: str
    product: str
    cost_center: str
    kind: str
    device_seconds: float
    cost_usd: Decimal

    def dims(self) -> tuple[str | Decimal, ...]:
        return (
            self.cluster,
            self.node,
            self.device_uuid,
            self.gpu_model,
            self.mig_profile,
            self.pricing,
            self.price_per_hour,
            self.namespace,
            self.pod,
            self.pod_uid,
            self.team,
            self.product,
            self.cost_center,
        )


EMPTY_DIMS: tuple[str | Decimal, ...] = ("",) * 6 + (_ZERO,) + ("",) * 6


@dataclass(frozen=True, slots=True)
class Charge:
    """The lines of one resource and charge period, summed."""

    resource_key: str
    start_ms: int
    end_ms: int
    instance_type: str
    gpu_instance: bool
    effective_cost: Decimal
    billed_cost: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class TrueupRow:
    hour_ms: int
    resource_key: str
    instance_type: str
    dims: tuple[str | Decimal, ...]  # MeteredRow.dims(), or cluster and node only, or empty
    kind: str
    device_seconds: float
    metered_cost_usd: Decimal
    effective_cost: Decimal
    billed_cost: Decimal
    currency: str


def charges(lines: Iterable[BillLine]) -> list[Charge]:
    """The lines with a ResourceId summed per (resource key, charge period, currency), sorted.
    A resource's instance type is the GPU instance type its lines name, else any type they
    name (the least, by text, where several: the result does not depend on line order)."""
    sums: dict[tuple[str, int, int, str], list[Decimal]] = {}
    types: dict[str, set[tuple[bool, str]]] = {}
    for line in lines:
        if not line.resource_key:
            continue
        key = (
            line.resource_key,
            line.charge_period_start_ms,
            line.charge_period_end_ms,
            line.billing_currency,
        )
        acc = sums.setdefault(key, [_ZERO, _ZERO])
        acc[0] += line.effective_cost
        acc[1] += line.billed_cost
        if line.instance_type:
            types.setdefault(line.resource_key, set()).add((line.gpu_instance, line.instance_type))
    chosen = {rk: min(named, key=lambda t: (not t[0], t[1])) for rk, named in types.items()}
    return [
        Charge(rk, start, end, chosen.get(rk, (False, ""))[1], chosen.get(rk, (False, ""))[0],
               acc[0], acc[1], currency)
        for (rk, start, end, currency), acc in sorted(sums.items())
    ]  # fmt: skip


@dataclass
class _Nodes:
    """Node identities by (cluster, node) in time order, and which nodes ever had a key."""

    history: dict[tuple[str, str], list[NodeIdentity]] = field(default_factory=dict)
    since: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    by_key: dict[str, set[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def of(cls, identities: Iterable[NodeIdentity]) -> _Nodes:
        nodes = cls()
        ordered = sorted(identities, key=lambda n: (n.cluster, n.node, n.since_ms, n.provider_id))
        for ident in ordered:
            nodes.history.setdefault((ident.cluster, ident.node), []).append(ident)
            nodes.since.setdefault((ident.cluster, ident.node), []).append(ident.since_ms)
            for key in node_keys(ident.provider_id):
                nodes.by_key.setdefault(key, set()).add((ident.cluster, ident.node))
        return nodes

    def at(self, node: tuple[str, str], time_ms: int) -> NodeIdentity:
        """The identity in force at `time_ms`: the latest from before it, else the earliest."""
        history = self.history[node]
        if len(history) == 1:
            return history[0]
        at = bisect.bisect_right(self.since[node], time_ms) - 1
        return history[max(at, 0)]


def true_up(
    bill_charges: Iterable[Charge],
    metered: Iterable[MeteredRow],
    identities: Iterable[NodeIdentity],
    rule: NonGpuRule,
) -> list[TrueupRow]:
    """Every charge of a known node or a GPU instance allocated (module docstring), as rows
    summed per (hour, resource, dimensions, kind), sorted."""
    nodes = _Nodes.of(identities)
    rows_by_node: dict[tuple[str, str], list[MeteredRow]] = {}
    for row in sorted(metered, key=_row_order):
        rows_by_node.setdefault((row.cluster, row.node), []).append(row)
    hours_by_node = {n: [r.hour_ms for r in rs] for n, rs in rows_by_node.items()}
    out: dict[_Key, _Acc] = {}
    for charge in sorted(bill_charges, key=_charge_order):
        matched = sorted(nodes.by_key.get(charge.resource_key, ()))
        if not matched and not charge.gpu_instance:
            continue
        rows: list[MeteredRow] = []
        for node in matched:
            node_rows = rows_by_node.get(node, [])
            hours = hours_by_node.get(node, [])
            lo = bisect.bisect_left(hours, _floor_hour(charge.start_ms))
            hi = bisect.bisect_left(hours, charge.end_ms)
            rows += [
                r
                for r in node_rows[lo:hi]
                if charge.resource_key
                in node_keys(nodes.at(node, r.hour_ms + HOUR_MS - 1).provider_id)
            ]
        weights = [r.cost_usd for r in rows]
        if not any(weights):
            weights = [Decimal(repr(r.device_seconds)) for r in rows]
        if not rows or not any(weights):
            dims = _node_dims(matched[0]) if matched else EMPTY_DIMS
            hours = charge_hours(charge)  # spread evenly: a daily line is 24 hourly parts
            even = [Decimal(1)] * len(hours)
            eff_parts = largest_remainder(charge.effective_cost, even, AMOUNT_QUANTUM)
            bill_parts = largest_remainder(charge.billed_cost, even, AMOUNT_QUANTUM)
            for hour, eff, bil in zip(hours, eff_parts, bill_parts, strict=True):
                _add(out, charge, hour, dims, KIND_UNMETERED, 0.0, _ZERO, eff, bil)
            continue
        effective, billed = charge.effective_cost, charge.billed_cost
        first = nodes.at(matched[0], charge.start_ms)
        fraction = rule.gpu_fraction(first)
        if fraction != 1:
            with localcontext(WIDE):
                gpu_effective = (effective * fraction).quantize(AMOUNT_QUANTUM, ROUND_HALF_EVEN)
                gpu_billed = (billed * fraction).quantize(AMOUNT_QUANTUM, ROUND_HALF_EVEN)
            _add(
                out,
                charge,
                _floor_hour(charge.start_ms),
                _node_dims(matched[0]),
                KIND_NON_GPU,
                0.0,
                _ZERO,
                effective - gpu_effective,
                billed - gpu_billed,
            )
            effective, billed = gpu_effective, gpu_billed
        eff_parts = largest_remainder(effective, weights, AMOUNT_QUANTUM)
        bill_parts = largest_remainder(billed, weights, AMOUNT_QUANTUM)
        for row, eff, bil in zip(rows, eff_parts, bill_parts, strict=True):
            _add(
                out,
                charge,
                row.hour_ms,
                row.dims(),
                row.kind,
                row.device_seconds,
                row.cost_usd,
                eff,
                bil,
            )
    return [
        TrueupRow(
            hour_ms=key.hour_ms,
            resource_key=key.resource_key,
            instance_type=key.instance_type,
            dims=key.dims,
            kind=key.kind,
            currency=key.currency,
            device_seconds=acc.seconds,
            metered_cost_usd=acc.metered,
            effective_cost=acc.effective,
            billed_cost=acc.billed,
        )
        for key, acc in sorted(out.items(), key=lambda kv: kv[0].order())
    ]


class _Key(NamedTuple):
    hour_ms: int
    resource_key: str
    instance_type: str
    dims: tuple[str | Decimal, ...]
    kind: str
    currency: str

    def order(self) -> tuple[object, ...]:
        # Each position of dims holds one type (text, or the price as a Decimal): comparable.
        return (
            self.hour_ms,
            self.resource_key,
            self.kind,
            self.dims,
            self.instance_type,
            self.currency,
        )


@dataclass(slots=True)
class _Acc:
    seconds: float = 0.0
    metered: Decimal = _ZERO
    effective: Decimal = _ZERO
    billed: Decimal = _ZERO


def _add(
    out: dict[_Key, _Acc],
    charge: Charge,
    hour_ms: int,
    dims: tuple[str | Decimal, ...],
    kind: str,
    seconds: float,
    metered: Decimal,
    effective: Decimal,
    billed: Decimal,
) -> None:
    key = _Key(hour_ms, charge.resource_key, charge.instance_type, dims, kind, charge.currency)
    acc = out.setdefault(key, _Acc())
    # The same key is the same metered row, whichever of its resource's charges (usage, data
    # transfer, a credit) reached it: its usage is counted once, the charges' shares add up.
    acc.seconds = seconds
    acc.metered = metered
    acc.effective += effective
    acc.billed += billed


def _node_dims(node: tuple[str, str]) -> tuple[str | Decimal, ...]:
    return (node[0], node[1], *EMPTY_DIMS[2:])


def charge_hours(charge: Charge) -> list[int]:
    """The starts of the hours a charge's period touches (at least one)."""
    return list(range(_floor_hour(charge.start_ms), charge.end_ms, HOUR_MS))


def _floor_hour(time_ms: int) -> int:
    return time_ms - time_ms % HOUR_MS


def _row_order(row: MeteredRow) -> tuple[object, ...]:
    return (
        row.cluster,
        row.node,
        row.hour_ms,
        row.kind,
        row.dims(),
        row.cost_usd,
        row.device_seconds,
    )


def _charge_order(charge: Charge) -> tuple[object, ...]:
    return (
        charge.resource_key,
        charge.start_ms,
        charge.end_ms,
        charge.currency,
        charge.effective_cost,
        charge.billed_cost,
    )


def affected_hours(old: Sequence[Charge], new: Sequence[Charge]) -> set[int]:
    """The hours a change from `old` to `new` charges reaches: every hour of a charge that is
    in one and not the other. Each charge is allocated on its own, so the rows of an unchanged
    charge in those hours (a monthly credit's share of them, say) come out as they were: the
    importer recomputes every charge that touches them and keeps only their rows in them."""
    hours: set[int] = set()
    for charge in set(old).symmetric_difference(new):
        hours |= _hours(charge)
    return hours


def _hours(charge: Charge) -> set[int]:
    return set(charge_hours(charge))


def in_hours(charge: Charge, hours: set[int]) -> bool:
    return bool(_hours(charge) & hours)


def by_resource(rows: Iterable[TrueupRow]) -> Mapping[str, Decimal]:
    """EffectiveCost per resource key (for checks and summaries)."""
    sums: dict[str, Decimal] = {}
    for row in rows:
        sums[row.resource_key] = sums.get(row.resource_key, _ZERO) + row.effective_cost
    return sums
