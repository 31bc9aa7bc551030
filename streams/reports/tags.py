"""Tag compliance: how much GPU cost cannot be charged back because labels are missing, which
namespaces and pods are responsible (ranked by cost), and which label keys were missing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from streams.reports.limits import MAX_RESULT_ROWS, query_bounded
from streams.reports.money import largest_remainder_cents, round_total
from streams.reports.params import Period, check_period, format_ms
from streams.reports.render import Tabular, display, money, pct
from streams.reports.sources import cost_source, read_plan
from streams.rows import UNKNOWN, UNTAGGED
from streams.store import ClickHouseStore

DEFAULT_LABEL_KEYS: Mapping[str, str] = {
    "team": "team",
    "product": "product",
    "cost_center": "cost-center",
}
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Offender:
    namespace: str
    pod: str  # empty for a namespace line
    pod_uid: str
    missing_keys: tuple[str, ...]
    untagged_cost_usd: Decimal
    share_of_untagged_pct: float


@dataclass(frozen=True, slots=True)
class MissingKey:
    label_key: str
    cost_usd: Decimal
    share_of_usage_pct: float


@dataclass(frozen=True, slots=True)
class TagsReport:
    period: Period
    total_usd: Decimal  # all metered GPU cost
    usage_usd: Decimal  # cost of pods (what tags can attribute)
    untagged_usd: Decimal  # pod cost with at least one required label missing
    missing_keys: tuple[MissingKey, ...]
    namespaces: tuple[Offender, ...]
    pods: tuple[Offender, ...]

    @property
    def untagged_share_of_total_pct(self) -> float:
        return float(self.untagged_usd / self.total_usd * 100) if self.total_usd else 0.0

    @property
    def untagged_share_of_usage_pct(self) -> float:
        return float(self.untagged_usd / self.usage_usd * 100) if self.usage_usd else 0.0

    def table(self) -> Sequence[Tabular]:
        span = f"{format_ms(self.period.start_ms)} to {format_ms(self.period.end_ms)}"
        summary = Tabular(
            f"Tag compliance, {span}",
            ("", "cost USD", "share"),
            (
                ("all metered GPU cost", money(round_total(self.total_usd)), "100.0%"),
                (
                    "pod cost (taggable)",
                    money(round_total(self.usage_usd)),
                    pct(float(self.usage_usd / self.total_usd * 100) if self.total_usd else None),
                ),
                (
                    "untagged pod cost",
                    money(round_total(self.untagged_usd)),
                    pct(self.untagged_share_of_total_pct),
                ),
            ),
            notes=(f"untagged is {pct(self.untagged_share_of_usage_pct)} of pod cost",),
        )
        keys = Tabular(
            "Missing label keys",
            ("label key", "cost USD", "share of pod cost"),
            tuple(
                (k.label_key, money(round_total(k.cost_usd)), pct(k.share_of_usage_pct))
                for k in self.missing_keys
            ),
        )
        cents = largest_remainder_cents([o.untagged_cost_usd for o in self.namespaces])
        namespaces = Tabular(
            "Namespaces with untagged cost, by cost",
            ("namespace", "untagged USD", "share", "missing keys"),
            tuple(
                (
                    display(o.namespace),
                    money(c),
                    pct(o.share_of_untagged_pct),
                    ", ".join(o.missing_keys),
                )
                for o, c in zip(self.namespaces, cents, strict=True)
            ),
            right_aligned_from=1,
        )
        pods = Tabular(
            "Pods with untagged cost, by cost (top 20)",
            ("namespace", "pod", "untagged USD", "share", "missing keys"),
            tuple(
                (
                    display(o.namespace),
                    o.pod or o.pod_uid,
                    money(round_total(o.untagged_cost_usd)),
                    pct(o.share_of_untagged_pct),
                    ", ".join(o.missing_keys),
                )
                for o in self.pods[:20]
            ),
            right_aligned_from=2,
        )
        return (summary, keys, namespaces, pods)

    def records(self) -> list[dict[str, Any]]:
        return [
            {
                "namespace": o.namespace,
                "pod": o.pod,
                "pod_uid": o.pod_uid,
                "untagged_cost_usd": o.untagged_cost_usd,
                "share_of_untagged_pct": round(o.share_of_untagged_pct, 4),
                "missing_keys": " ".join(o.missing_keys),
            }
            for o in self.pods
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": "tags",
            "from": format_ms(self.period.start_ms),
            "to": format_ms(self.period.end_ms),
            "total_usd": self.total_usd,
            "usage_usd": self.usage_usd,
            "untagged_usd": self.untagged_usd,
            "untagged_share_of_total_pct": round(self.untagged_share_of_total_pct, 4),
            "untagged_share_of_usage_pct": round(self.untagged_share_of_usage_pct, 4),
            "missing_keys": [
                {
                    "label_key": k.label_key,
                    "cost_usd": k.cost_usd,
                    "share_of_usage_pct": round(k.share_of_usage_pct, 4),
                }
                for k in self.missing_keys
            ],
            "namespaces": [
                {
                    "namespace": o.namespace,
                    "untagged_cost_usd": o.untagged_cost_usd,
                    "share_of_untagged_pct": round(o.share_of_untagged_pct, 4),
                    "missing_keys": list(o.missing_keys),
                }
                for o in self.namespaces
            ],
            "pods": [{**r, "missing_keys": r["missing_keys"].split()} for r in self.records()],
        }


def tag_compliance(
    store: ClickHouseStore,
    period: Period,
    *,
    label_keys: Mapping[str, str] = DEFAULT_LABEL_KEYS,
    use_rollups: bool = True,
) -> TagsReport:
    check_period(period)
    plan = read_plan(store, period.start_ms, period.end_ms, use_rollups=use_rollups)
    costs = cost_source(store.database, plan)
    totals = store.query_rows(f"SELECT sum(cost_usd), sumIf(cost_usd, kind = 'usage') FROM {costs}")
    total, usage = (totals[0][0] or _ZERO, totals[0][1] or _ZERO) if totals else (_ZERO, _ZERO)
    rows = query_bounded(
        store,
        f"SELECT namespace, pod, pod_uid, team, product, cost_center, sum(cost_usd) AS cost "
        f"FROM {costs} WHERE kind = 'usage' AND (team IN ('{UNTAGGED}', '{UNKNOWN}') "
        f"OR product IN ('{UNTAGGED}', '{UNKNOWN}') OR cost_center IN ('{UNTAGGED}', "
        f"'{UNKNOWN}')) GROUP BY namespace, pod, pod_uid, team, product, cost_center",
        limit=MAX_RESULT_ROWS,
        what="the tags report (one row per untagged pod and its labels)",
        narrow="give a shorter period",
    )
    by_key = dict.fromkeys(label_keys.values(), _ZERO)
    pods: dict[tuple[str, str, str], tuple[Decimal, set[str]]] = {}
    namespaces: dict[str, tuple[Decimal, set[str]]] = {}
    untagged = _ZERO
    for namespace, pod, pod_uid, team, product, cost_center, cost in rows:
        values = {"team": team, "product": product, "cost_center": cost_center}
        missing = {label_keys[d] for d, v in values.items() if v in (UNTAGGED, UNKNOWN)}
        untagged += cost
        for key in missing:
            by_key[key] += cost
        p_cost, p_keys = pods.get((namespace, pod, pod_uid), (_ZERO, set()))
        pods[(namespace, pod, pod_uid)] = (p_cost + cost, p_keys | missing)
        n_cost, n_keys = namespaces.get(namespace, (_ZERO, set()))
        namespaces[namespace] = (n_cost + cost, n_keys | missing)

    def share(cost: Decimal, of: Decimal) -> float:
        return float(cost / of * 100) if of else 0.0

    def ordered(keys: set[str]) -> tuple[str, ...]:
        return tuple(k for k in label_keys.values() if k in keys)

    return TagsReport(
        period=period,
        total_usd=total,
        usage_usd=usage,
        untagged_usd=untagged,
        missing_keys=tuple(
            MissingKey(k, c, share(c, usage))
            for k, c in sorted(by_key.items(), key=lambda kv: -kv[1])
        ),
        namespaces=tuple(
            Offender(ns, "", "", ordered(keys), cost, share(cost, untagged))
            for ns, (cost, keys) in sorted(namespaces.items(), key=lambda kv: (-kv[1][0], kv[0]))
        ),
        pods=tuple(
            Offender(ns, pod, uid, ordered(keys), cost, share(cost, untagged))
            for (ns, pod, uid), (cost, keys) in sorted(
                pods.items(), key=lambda kv: (-kv[1][0], kv[0])
            )
        ),
    )
