"""Peak memory bandwidth of the GPUs a lent machine may have, from the vendor's datasheets: the benchmarks' bandwidth
fractions and attention bounds are of the card the run is on. Issue #14's targets are the H200's; the lent kinds
include an H100 (80 GB, HBM3: 3.35 TB/s), against whose 4.8 TB/s every fraction would read 0.7 of what it is."""

from __future__ import annotations

H200_BYTES_S = 4.8e12
# (a part of the name torch.cuda.get_device_name reports, bytes/s), most specific first
PEAKS = (("H200", H200_BYTES_S), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
         ("A100 80GB PCIe", 1.935e12), ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12))


def peak_bytes_s(device_name: str) -> tuple[float, str]:
    """The card's peak memory bandwidth and which card it was taken for; an unknown card is taken as an H200, the
    issue's, and the second value says so."""
    for part, peak in PEAKS:
        if part in device_name:
            return peak, part
    return H200_BYTES_S, f"H200 (assumed: {device_name!r} is not in benchmarks/peaks.py)"
