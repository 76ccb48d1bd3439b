"""What this CPU offers the backends, read from /proc/cpuinfo (and torch's own check): detected, never assumed."""

from __future__ import annotations

import functools

# Flags that change which backend and dtype run fastest (../shared/MEASUREMENTS.md).
FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


@functools.cache
def cpu_features() -> dict:
    """{"model": name, "cores": n, "flags": [what of FLAGS it has], "amx": bool, "native_bf16": bool}."""
    from clipsite.config import cpu_cores

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    have = [flag for flag in FLAGS if flag in flags]
    return {
        "model": model or "unknown",
        "cores": cpu_cores(),
        "flags": have,
        "amx": "amx_bf16" in flags,
        "native_bf16": "amx_bf16" in flags or "avx512_bf16" in flags,
    }
