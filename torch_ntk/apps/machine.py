"""What a measurement ran on: one place for the machine description of every app."""
from __future__ import annotations

import datetime
import os
import platform

import torch

import torch_ntk


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine(device: str | torch.device = "cpu") -> str:
    """One line: the GPU's name for a CUDA device, else the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def machine_info(device: str | torch.device = "cpu") -> dict:
    """Versions, CPU/GPU model, threads, memory and date for a JSON record."""
    device = torch.device(device)
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_ntk": torch_ntk.__version__, "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_gib": round(total_memory_gib(), 1), "native": torch_ntk.native.info()}
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def run_record(device: str | torch.device = "cpu") -> dict:
    """The versions, threads, machine line and date a demo's JSON config records."""
    return {"torch": torch.__version__, "torch_ntk": torch_ntk.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": describe_machine(device),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def total_memory_gib() -> float:
    """Physical memory of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return float("nan")
