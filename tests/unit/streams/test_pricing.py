"""Price book: lookups by model, class and date; MIG prices; errors that name the line."""

from __future__ import annotations

from decimal import Decimal

import pytest

from runtime.errors import PriceBookError
from streams.pricing import (
    EXAMPLE_PRICE_BOOK,
    device_price_per_hour,
    load_price_book,
    parse_price_book,
)

H100 = "NVIDIA H100 80GB HBM3"
JUNE_2026_MS = 1_781_000_000_000  # 2026-06-09
AUG_2026_MS = 1_786_000_000_000  # 2026-08-06


def test_example_book_ships_the_promised_models() -> None:
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    models = {e.gpu_model for e in book.entries}
    assert {H100, "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "NVIDIA A10G"} <= models
    for model in models:
        assert book.quote(model, "spot", AUG_2026_MS).pricing == "spot"
        assert book.quote(model, "on_demand", AUG_2026_MS).known_model


def test_latest_entry_not_after_the_time_applies() -> None:
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    assert book.quote(H100, "on_demand", JUNE_2026_MS).price_per_hour_usd == Decimal("6.88")
    assert book.quote(H100, "on_demand", AUG_2026_MS).price_per_hour_usd == Decimal("4.00")


def test_unknown_model_uses_the_default_and_says_so() -> None:
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    quote = book.quote("NVIDIA B200", "on_demand", AUG_2026_MS)
    assert quote.price_per_hour_usd == Decimal("2.00")
    assert not quote.known_model


def test_missing_class_falls_back_to_on_demand() -> None:
    book = parse_price_book(
        "default_price_per_hour: 1\nprices:\n  - {gpu_model: X, pricing: on_demand, "
        "price_per_hour: 3.5}\n"
    )
    quote = book.quote("X", "reserved", 0)
    assert (quote.price_per_hour_usd, quote.pricing, quote.known_model) == (
        Decimal("3.5"),
        "on_demand",
        True,
    )


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"karpenter.sh/capacity-type": "spot"}, "spot"),
        ({"karpenter.sh/capacity-type": "on-demand"}, "on_demand"),
        ({"eks.amazonaws.com/capacityType": "SPOT"}, "spot"),
        ({"cloud.google.com/gke-spot": "true"}, "spot"),
        ({"kubernetes.azure.com/scalesetpriority": "spot"}, "spot"),
        ({"node.kubernetes.io/instance-type": "p5.48xlarge"}, "on_demand"),
        ({}, "on_demand"),
    ],
)
def test_pricing_class_from_node_labels(labels: dict[str, str], expected: str) -> None:
    assert load_price_book(EXAMPLE_PRICE_BOOK).pricing_class(labels) == expected


def test_mig_instance_costs_its_share_of_slices() -> None:
    assert device_price_per_hour(Decimal("7.00"), 1, 7) == Decimal("1.00")
    assert device_price_per_hour(Decimal("7.00"), 3, 7) == Decimal("3.00")
    assert device_price_per_hour(Decimal("7.00"), None, 7) == Decimal("7.00")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("currency: USD\nprices: []\n", 1, "default_price_per_hour is required"),
        (
            "default_price_per_hour: 2\nprices:\n  - gpu_model: X\n    pricing: cheap\n"
            "    price_per_hour: 1\n",
            3,
            "pricing 'cheap'",
        ),
        (
            "default_price_per_hour: 2\nprices:\n  - gpu_model: X\n    price_per_hour: -1\n",
            3,
            "zero or more",
        ),
        (
            "default_price_per_hour: 2\nprices:\n  - {gpu_model: X, price_per_hour: 1,"
            " effective_from: soon}\n",
            3,
            "effective_from",
        ),
        (
            "default_price_per_hour: 2\nprices:\n  - {gpu_model: X, price_per_hour: 1}\n"
            "  - {gpu_model: X, price_per_hour: 2}\n",
            4,
            "duplicate",
        ),
        ("default_price_per_hour: [\n", 2, "not valid YAML"),
        ("- a\n- b\n", 1, "mapping at the top level"),
    ],
)
def test_bad_files_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(PriceBookError) as err:
        parse_price_book(text, source="book.yaml")
    assert f"book.yaml:{line}:" in str(err.value)
    assert fragment in str(err.value)
    assert err.value.line == line


def test_unreadable_file_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(PriceBookError, match="cannot read price book"):
        load_price_book("/nonexistent/prices.yaml")


def test_every_entry_has_a_stable_id_and_the_entry_in_force_is_found() -> None:
    book = load_price_book(EXAMPLE_PRICE_BOOK)
    ids = [e.entry_id for e in book.entries]
    assert len(set(ids)) == len(ids)
    assert f"{H100}|on_demand|2026-07-01" in ids
    again = load_price_book(EXAMPLE_PRICE_BOOK)
    assert [e.entry_id for e in again.entries] == ids  # derived, so the same on every load
    june = book.entry_at(H100, "on_demand", JUNE_2026_MS)
    aug = book.entry_at(H100, "on_demand", AUG_2026_MS)
    assert june is not None and june.entry_id == f"{H100}|on_demand|2026-01-01"
    assert aug is not None and aug.price_per_hour_usd == Decimal("4.00")
    assert book.entry_at("NVIDIA B200", "on_demand", AUG_2026_MS) is None  # the default price
    assert book.entry_at(H100, "on_demand", 0) is None  # before the first entry


def test_an_explicit_id_is_kept_and_must_be_unique() -> None:
    text = (
        "default_price_per_hour: 1\n"
        "prices:\n"
        "  - {gpu_model: A, price_per_hour: 1, id: contract-7/a}\n"
        "  - {gpu_model: B, price_per_hour: 2}\n"
    )
    book = parse_price_book(text)
    assert [e.entry_id for e in book.entries] == ["contract-7/a", "B|on_demand|always"]
    second_b = "{gpu_model: B, price_per_hour: 2, id: contract-7/a}"
    with pytest.raises(PriceBookError, match=":4: id 'contract-7/a' is used by another entry"):
        parse_price_book(text.replace("{gpu_model: B, price_per_hour: 2}", second_b))
    with pytest.raises(PriceBookError, match="reserved"):
        parse_price_book(text.replace("contract-7/a", "default"))
