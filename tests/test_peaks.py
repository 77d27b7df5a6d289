"""The benchmarks' peak bandwidth is the card's own, by the name torch reports for it."""

import pytest

from benchmarks.peaks import H200_BYTES_S, peak_bytes_s


@pytest.mark.parametrize(("name", "peak", "card"), [
    ("NVIDIA H200", 4.8e12, "H200"),
    ("NVIDIA H100 80GB HBM3", 3.35e12, "H100"),  # the lent nvidia-h100-x1 kind's card
    ("NVIDIA H100 NVL", 3.9e12, "H100 NVL"),
    ("NVIDIA H100 PCIe", 2.0e12, "H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", 2.039e12, "A100-SXM4-80GB"),
])
def test_known_cards(name: str, peak: float, card: str) -> None:
    assert peak_bytes_s(name) == (peak, card)


def test_an_unknown_card_is_taken_as_the_issues_h200_and_says_so() -> None:
    peak, card = peak_bytes_s("NVIDIA GB200")
    assert peak == H200_BYTES_S and "assumed" in card and "NVIDIA GB200" in card
