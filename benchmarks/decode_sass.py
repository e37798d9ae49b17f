"""SASS of the decode-step kernels (hippolm.ops.decode) compiled for sm_90 without a GPU, one file
per kernel case, with line info and comments stripped: to check that a refactor of a GPU-timed
kernel compiles to the same code (then its timings stand) before spending GPU time.

    python benchmarks/decode_sass.py /tmp/sass_before   # on the old tree (e.g. SRC via PYTHONPATH)
    python benchmarks/decode_sass.py /tmp/sass_after
    diff -r /tmp/sass_before /tmp/sass_after
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hippolm.ops import decode

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
BF16 = {"Q", "K", "V", "KEYS", "VALUES", "RING_G", "GATE", "OPROJ", "NW"}  # 16-bit tensors as the AHN step passes
INT64 = {"CURSOR", "SLOT_POS", "POS", "STEPPED"}
CASES = {  # name: (kernel, compile-time arguments, warps) as the host launches them at head dim 128
    "ll_step_gdn": (decode._loglinear_step_kernel, dict(KD=128, VD=128, BV=64, HAS_G=True, HAS_BETA=True,
                                                        HAS_VALID=True, ALL_LEVELS=False), 4),
    "cache_gdn": (decode._memory_step_cache_kernel, dict(KD=128, VD=128, G_IDX=0, BETA_IDX=1, DELTA=True,
                                                         HAS_PROJ=False), 8),
    "cache_dn_proj": (decode._memory_step_cache_kernel, dict(KD=128, VD=128, G_IDX=-1, BETA_IDX=0, DELTA=True,
                                                             HAS_PROJ=True), 8),
    "ll_cache_gdn": (decode._loglinear_step_cache_kernel, dict(KD=128, VD=128, BV=64, G_IDX=0, BETA_IDX=1,
                                                               KSCALE_IDX=-1), 4),
    "ll_cache_m2": (decode._loglinear_step_cache_kernel, dict(KD=128, VD=128, BV=64, G_IDX=0, BETA_IDX=-1,
                                                              KSCALE_IDX=1), 4),
    "rec_gdn": (decode._recurrent_step_kernel, dict(KD=128, VD=128, BV=64, HAS_STATE=True, HAS_G=True,
                                                    HAS_BETA=True), 4),
    "rec_ssd": (decode._recurrent_step_kernel, dict(KD=128, VD=128, BV=64, HAS_STATE=False, HAS_G=True,
                                                    HAS_BETA=False), 4),
}


def sass(fn, consts: dict, warps: int) -> str:
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif (n.isupper() or n.endswith("_")) and n not in ("H", "L"):  # pointers are upper-case
            sig[n] = "*bf16" if n in BF16 else ("*i64" if n in INT64 else "*fp32")
        else:
            sig[n] = "fp32" if n in ("eps", "scale") else "i32"
    kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("//"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for one <case>.sass per kernel case")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (fn, consts, warps) in CASES.items():
        (out / f"{name}.sass").write_text(sass(fn, consts, warps))
        print(name, "written", flush=True)


if __name__ == "__main__":
    main()
