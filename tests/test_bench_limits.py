"""export/cpu.py's peak and export/bench.py's FLOP count: the %limit column's numerator and denominator.

The peak's arithmetic is checked against hand-computed values for given flags, cores and clocks; that it is an
upper bound, against GEMMs measured on this machine; the count of FLOPs no engine can skip, against a
brute-force count of the convolution taps that read the image."""
import itertools

import pytest
import torch

from export import bench, cpu


@pytest.mark.parametrize("flags, family, expected", [
    ({"sse2"}, None, {"fp32": 16, "bf16": 16, "int8": 64}),
    ({"avx2", "fma"}, None, {"fp32": 32, "bf16": 32, "int8": 128}),  # 2 FMA x 8 lanes x 2
    ({"avx2", "fma", "avx_vnni"}, None, {"fp32": 32, "bf16": 32, "int8": 128}),
    ({"avx512f", "avx512bw"}, None, {"fp32": 64, "bf16": 64, "int8": 256}),  # 2 FMA x 16 lanes x 2
    ({"avx512f", "avx512_bf16", "avx512_vnni"}, None, {"fp32": 64, "bf16": 128, "int8": 256}),
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, None, {"fp32": 64, "bf16": 2048, "int8": 4096}),
    ({"avx512f", "avx512_bf16", "avx512_vnni"}, 25, {"fp32": 32, "bf16": 64, "int8": 128}),  # Zen 4: 256-bit FMAs
    ({"avx2", "fma"}, 25, {"fp32": 32, "bf16": 32, "int8": 128}),  # Zen 3
    ({"asimd", "asimddp", "bf16"}, None, {"fp32": 32, "bf16": 128, "int8": 128}),
    ({"asimd", "sve", "i8mm"}, None, {"fp32": 64, "bf16": 64, "int8": 512}),
    (set(), None, {}),
])
def test_operations_per_cycle_from_the_flags(flags, family, expected):
    assert cpu.ops_per_cycle(frozenset(flags), family) == expected


def test_peak_is_ops_per_cycle_times_cores_times_clock():
    avx512 = frozenset({"avx512f", "avx512_bf16", "avx512_vnni"})
    one = cpu.peak_limits(1, avx512, clock_hz=2.5e9, cpus=2)
    assert (one["fp32"], one["bf16"], one["int8"]) == pytest.approx((160.0, 320.0, 640.0))  # 64/128/256 x 2.5
    assert one["cores"] == 1 and one["clock_ghz"] == 2.5
    four = cpu.peak_limits(4, avx512, clock_hz=2.5e9, cpus=2)  # 4 threads on 2 CPUs: 2 cores' worth
    assert four["cores"] == 2 and four["fp32"] == pytest.approx(320.0)
    zen4 = cpu.peak_limits(2, avx512, clock_hz=5.2e9, cpus=2, amd_family=25)
    assert zen4["fp32"] == pytest.approx(2 * 32 * 5.2) and zen4["int8"] == pytest.approx(2 * 128 * 5.2)
    unknown = cpu.peak_limits(1, frozenset(), clock_hz=3e9, cpus=1)
    assert not {"fp32", "bf16", "int8"} & set(unknown)
    assert "fp32" not in cpu.peak_limits(1, avx512, clock_hz=0.0, cpus=1)


def test_clock_bound_allows_for_boost_unless_the_driver_publishes_it():
    hz, how = cpu.clock_bound(3.7e9, "intel_pstate", 2000.0, 2.0)
    assert hz == 3.7e9 and "intel_pstate" in how
    hz, how = cpu.clock_bound(2.45e9, "acpi-cpufreq", 1500.0, 0.0)  # the highest P-state, not the boost
    assert hz == pytest.approx(4.9e9) and "x 2" in how
    hz, how = cpu.clock_bound(0.0, "", 2596.136, 0.0)  # a VM: /proc/cpuinfo's nominal clock only
    assert hz == pytest.approx(5.192272e9) and "/proc/cpuinfo" in how
    hz, how = cpu.clock_bound(0.0, "", 0.0, 2.1)  # "Intel(R) Xeon(R) ... @ 2.10GHz"
    assert hz == pytest.approx(4.2e9) and "model name" in how
    assert cpu.clock_bound(0.0, "", 0.0, 0.0)[0] == 0.0


def test_this_machine_measures_no_gemm_above_its_peak():
    """The bound against what torch, onnxruntime and OpenVINO reach now (1 thread, a 1024^3 GEMM)."""
    peak, measured = cpu.peak_limits(1), cpu.measured_limits(1, n=1024)
    assert peak["cores"] == 1 and peak["clock_ghz"] > 0
    for kind in ("fp32", "bf16", "int8"):
        if kind in measured:
            assert 0 < measured[kind] <= peak[kind], kind


def _taps_brute_force(n_in, n_out, k, s, p, d):
    return sum(0 <= o * s - p + t * d < n_in for o in range(n_out) for t in range(k))


def test_taps_inside_the_image_against_brute_force():
    for n_in, k, s, p, d in itertools.product((1, 5, 9, 17), (1, 3, 7), (1, 2), (0, 1, 3, 12), (1, 2, 6, 18)):
        n_out = (n_in + 2 * p - d * (k - 1) - 1) // s + 1
        if n_out > 0:
            assert bench.taps_inside(n_in, n_out, k, s, p, d) == _taps_brute_force(n_in, n_out, k, s, p, d)


def test_required_flops_leave_out_products_with_zero_padding():
    plain = torch.nn.Conv2d(3, 2, 3)  # no padding: every product reads the image
    assert bench.required_flops(plain, 9) == bench.count_flops(plain, 9) == 2 * 3 * 2 * 9 * 7 * 7
    atrous = torch.nn.Conv2d(3, 4, 3, padding=12, dilation=12)  # rate 12 on 9x9: only the centre tap inside
    assert bench.count_flops(atrous, 9) == 2 * 3 * 4 * 9 * 81
    assert bench.required_flops(atrous, 9) == 2 * 3 * 4 * 1 * 81
    same = torch.nn.Conv2d(3, 4, 3, padding=1)  # 9x9, pad 1: each axis has 9 + 8 + 8 taps inside of 27
    assert bench.required_flops(same, 9) == 2 * 3 * 4 * 25 * 25


def test_the_log_line_gives_the_peak_how_it_was_found_and_the_measured_share():
    peak = cpu.peak_limits(2, frozenset({"avx2", "fma"}), clock_hz=3e9, cpus=2)  # 2 x 32 x 3 = 192 GFLOP/s
    line = bench.describe_limits(peak, {"fp32": 96.0, "int8": 192.0})
    assert "fp32 192, bf16 192, int8 768 = 2 core(s) x 32/32/128" in line and "3.00 GHz [given]" in line
    assert "fp32 96 (50%)" in line and "int8 192 (25%)" in line
    assert "%limit left out" in bench.describe_limits(cpu.peak_limits(1, frozenset(), clock_hz=3e9, cpus=1), {})
