"""What a run or an evaluation ran on: bf16 training is reproducible on one machine but not across machines, so
every run folder and benchmark result says which machine produced it."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The CPU's model name and which of ``CPU_FEATURES`` it has (Linux's /proc/cpuinfo; elsewhere the platform's
    processor string and no features)."""
    try:
        info = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.processor() or platform.machine()), [f for f in CPU_FEATURES if f in flags]


def machine_info(device: torch.device | str | None = None) -> dict:
    """The hardware and software of this process: CPU model and its bf16-relevant features, torch's threads and
    version, Python, and the GPU's name where ``device`` is a CUDA device."""
    cpu, features = _cpu()
    info = {"cpu": cpu, "cpu_features": features, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict) -> str:
    """One line for reports: the GPU's name, or the CPU's with its features, e.g. ``Intel(R) Xeon(R) Processor (avx2,
    avx512f, avx512_bf16, amx_bf16)``."""
    if "gpu" in info:
        return info["gpu"]
    features = info.get("cpu_features", [])
    return f"{info['cpu']} ({', '.join(features)})" if features else info["cpu"]
