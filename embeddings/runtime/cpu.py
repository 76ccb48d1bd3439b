"""What this CPU offers the backends, read from /proc/cpuinfo (and torch's own check): detected, never assumed."""

from __future__ import annotations

import functools

# Flags that change which backend and dtype run fastest (../shared/MEASUREMENTS.md).
FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
# Integer dot products (u8 x s8 summed to int32) without the 16-bit saturation of AVX2's VPMADDUBSW.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_features() -> dict:
    """{"model": name, "cores": n, "flags": [what of FLAGS it has], "amx": bool, "native_bf16": bool,
    "vnni": bool}."""
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
        "vnni": any(flag in flags for flag in VNNI_FLAGS),
    }


def int8_reduce_range() -> bool:
    """Whether int8 weights keep to 7 bits here: without VNNI, ONNX Runtime's int8 kernels saturate."""
    return not cpu_features()["vnni"]
