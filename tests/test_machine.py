"""The machine record that run folders and benchmark results carry."""
import platform
from pathlib import Path

import torch

from hydranets.machine import _cpu, describe, machine_info

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000 @ 2.0GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
processor\t: 1
model name\t: Test CPU 9000 @ 2.0GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
"""


def test_cpu_name_and_features_from_cpuinfo(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    name, features = _cpu(tmp_path / "cpuinfo")
    assert name == "Test CPU 9000 @ 2.0GHz"
    assert features == ["avx2", "avx512f", "avx512_bf16"]  # amx_tile is not amx_bf16


def test_cpu_without_cpuinfo_falls_back_to_platform(tmp_path: Path) -> None:
    name, features = _cpu(tmp_path / "absent")
    assert name == (platform.processor() or platform.machine()) and name and features == []
    (tmp_path / "no-name").write_text("processor\t: 0\nflags\t\t: avx2 avx512f\n")  # e.g. an ARM cpuinfo
    assert _cpu(tmp_path / "no-name") == (platform.processor() or platform.machine(), ["avx2", "avx512f"])


def test_machine_info_of_this_process() -> None:
    info = machine_info("cpu")
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert "gpu" not in info
    assert describe(info).startswith(info["cpu"])


def test_describe() -> None:
    assert describe({"cpu": "X", "cpu_features": ["avx2", "amx_bf16"]}) == "X (avx2, amx_bf16)"
    assert describe({"cpu": "X", "cpu_features": []}) == "X"
    assert describe({"cpu": "X", "cpu_features": ["avx2"], "gpu": "NVIDIA H100"}) == "NVIDIA H100"
