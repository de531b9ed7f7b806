"""Check the GPU architectures in the nvcc commands of a CMake build (compile_commands.json).

Every ``.cu`` file must be compiled to machine code (SASS) for exactly the expected
architectures, with PTX, if any, only for those; anything else (for example torch's fallback
list when no GPU is visible, which starts at compute_50 and which nvcc 13 rejects) fails.
Used by tools/check_cuda_build.sh.

With ``--so``, checks a built library instead: the machine-code (cubin) architectures embedded
in it must be exactly the expected ones.

Usage: python tools/cuda_arch_flags.py BUILD/compile_commands.json 80 90
       python tools/cuda_arch_flags.py --so BUILD/_C*.so 80 90
Exit: 0 when every .cu command (or the library) matches, 1 otherwise.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
import sys
from pathlib import Path

_CODE = re.compile(r"(sm|compute)_(\d+[af]?)")


def targets(argv: list[str]) -> tuple[set[str], set[str]]:
    """(SASS architectures, PTX architectures) that an nvcc command line asks for."""
    sass: set[str] = set()
    ptx: set[str] = set()
    values = []
    for i, arg in enumerate(argv):
        for flag in ("-gencode", "--generate-code", "-arch", "--gpu-architecture", "-code",
                     "--gpu-code"):
            if arg == flag and i + 1 < len(argv):
                values.append((flag, argv[i + 1]))
            elif arg.startswith(flag + "="):
                values.append((flag, arg[len(flag) + 1:]))
    for flag, value in values:
        if flag in ("-gencode", "--generate-code"):
            fields = dict(part.split("=", 1) for part in re.split(r",(?![^\[]*\])", value)
                          if "=" in part)
            code = fields.get("code", fields.get("arch", ""))
        else:
            code = value  # -arch=sm_90 embeds sm_90 SASS and compute_90 PTX
            if flag in ("-arch", "--gpu-architecture") and code.startswith("sm_"):
                ptx.add(code[3:])
        for kind, arch in _CODE.findall(code):
            (sass if kind == "sm" else ptx).add(arch)
    return sass, ptx


def check(path: Path, expected: set[str]) -> bool:
    commands = json.loads(path.read_text())
    cu = [c for c in commands if c["file"].endswith(".cu")]
    if not cu:
        print(f"cuda_arch_flags: no .cu file in {path}: the CUDA kernels are not built")
        return False
    ok = True
    for entry in cu:
        argv = entry.get("arguments") or shlex.split(entry["command"])
        sass, ptx = targets(argv)
        name = Path(entry["file"]).name
        bad = []
        if sass != expected:
            bad.append(f"SASS for {sorted(sass) or 'nothing'}, expected {sorted(expected)}")
        if not ptx <= expected:
            bad.append(f"PTX for {sorted(ptx - expected)}")
        print(f"  {'ok  ' if not bad else 'FAIL'}  {name}: sm_{', sm_'.join(sorted(sass)) or '-'}"
              f"{'; PTX ' + ', '.join(sorted(ptx)) if ptx else ''}"
              f"{'  <- ' + '; '.join(bad) if bad else ''}")
        ok &= not bad
    return ok


def cubin_archs(data: bytes) -> list[str]:
    """Architectures of the CUDA ELF images (cubins, e_machine 190) found in ``data``, one per
    image. ELF ABI version 8 (CUDA 12.8+) keeps the SM number in e_flags bits 8-15, older ones in
    bits 0-7. Compressed images are not seen."""
    archs = []
    at = data.find(b"\x7fELF")
    while at >= 0:
        if data[at + 4] == 2 and struct.unpack_from("<H", data, at + 18)[0] == 190:  # 64-bit CUDA
            flags = struct.unpack_from("<I", data, at + 48)[0]
            archs.append(str((flags >> 8) & 0xFF if data[at + 8] >= 8 else flags & 0xFF))
        at = data.find(b"\x7fELF", at + 4)
    return archs


def check_library(path: Path, expected: set[str]) -> bool:
    archs = cubin_archs(path.read_bytes())
    ok = bool(archs) and set(archs) == expected
    found = ", ".join(f"sm_{a}" for a in sorted(set(archs))) or "none"
    want = ", ".join(f"sm_{a}" for a in sorted(expected))
    print(f"  {'ok  ' if ok else 'FAIL'}  {path.name}: {len(archs)} cubins for {found}"
          f"{'' if ok else f'  <- expected {want}'}")
    return ok


def main(argv: list[str]) -> int:
    so = bool(argv) and argv[0] == "--so"
    argv = argv[1:] if so else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    return 0 if (check_library if so else check)(Path(argv[0]), set(argv[1:])) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
