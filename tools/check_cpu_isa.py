"""Check that only the per-ISA kernel variants of icpo's extension use AVX instructions.

The CPU kernels are compiled once per instruction set (cmake/icpo_cpu_kernels.cmake) and chosen
at run time, so the library as a whole must run on any x86-64 CPU: every function that uses an
AVX / AVX2 / AVX-512 instruction must belong to a variant (its demangled name mentions the
variant's namespace, ``icpo_avx2`` / ``icpo_avx512``), which runs only after the dispatcher has
checked the CPU. A function elsewhere with such instructions means an inline function from a
header was emitted by an ISA-flagged object and kept by the linker for everyone: the
illegal-instruction crash this build exists to prevent.

It also checks that the ``avx2`` variant holds no AVX-512 (EVEX) instruction.

Usage: ``python tools/check_cpu_isa.py [path/to/_C.so]``. The library must keep its symbol table:
the installed copy is stripped, so the default is the newest ``build/*/_C*.so`` of this checkout.
Prints the count of AVX functions per variant; exits 1, listing them, if any lies outside (or an
AVX-512 one inside ``avx2``), 2 if it cannot check. Needs GNU ``objdump``; x86-64 only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# objdump -d headers: "0000000000012340 <demangled name>:"
_FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")
# AVX family: VEX / EVEX mnemonics all start with "v"; ymm / zmm / opmask registers.
_AVX_REG = re.compile(r"%(ymm|zmm)\d+|%k[0-7]\b")
# AVX-512 only (EVEX): zmm, opmask and the upper 16 xmm / ymm registers, {k} / {1toN} operands.
_AVX512 = re.compile(r"%zmm\d+|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{")
_VARIANTS = ("icpo_avx512", "icpo_avx2", "icpo_native")
REPO = Path(__file__).resolve().parent.parent


def _is_avx(line: str) -> bool:
    parts = line.split("\t")
    if len(parts) < 2:
        return False
    insn = parts[-1].strip()
    mnemonic = insn.split(" ", 1)[0]
    # verr / verw are old segment-verification instructions, not vector ones.
    return (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or bool(
        _AVX_REG.search(insn))


def _insn(line: str) -> str:
    return line.split("\t")[-1].strip()


def avx_functions(library: str) -> tuple[dict[str, int], dict[str, int]]:
    """Demangled name -> count of AVX-family, and of AVX-512, instructions (functions with any)."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], check=True,
                         capture_output=True, text=True).stdout
    avx: dict[str, int] = {}
    avx512: dict[str, int] = {}
    current = None
    for line in out.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            continue
        if current is not None and _is_avx(line):
            avx[current] = avx.get(current, 0) + 1
            if _AVX512.search(_insn(line)):
                avx512[current] = avx512.get(current, 0) + 1
    return avx, avx512


def has_symbol_table(library: str) -> bool:
    """False for a stripped library, whose functions objdump cannot tell apart."""
    out = subprocess.run(["objdump", "-t", library], check=True, capture_output=True,
                         text=True).stdout
    return " F .text" in out


def default_library() -> str | None:
    """The newest unstripped extension built in this checkout (scikit-build-core's build dir)."""
    built = sorted(REPO.glob("build/*/_C*.so"), key=lambda p: p.stat().st_mtime)
    return str(built[-1]) if built else None


def variant_of(name: str) -> str | None:
    """The variant namespace a function belongs to (first mentioned wins), or None."""
    hits = [(name.find(v), v) for v in _VARIANTS if v in name]
    return min(hits)[1] if hits else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", nargs="?", help="the extension .so (default: icpo._C)")
    args = parser.parse_args(argv)
    if shutil.which("objdump") is None:
        print("check_cpu_isa: objdump (binutils) not found", file=sys.stderr)
        return 2
    library = args.library or default_library()
    if library is None:
        print("check_cpu_isa: no build/*/_C*.so here; pass the library", file=sys.stderr)
        return 2
    if not has_symbol_table(library):
        print(f"check_cpu_isa: {library} is stripped; pass the unstripped build/*/_C*.so",
              file=sys.stderr)
        return 2
    found, avx512 = avx_functions(library)
    per_variant = Counter(variant_of(n) for n in found)
    stray = sorted(n for n in found if variant_of(n) is None)
    avx512_in_avx2 = sorted(n for n in avx512 if variant_of(n) == "icpo_avx2")
    print(f"{library}: {len(found)} functions use AVX-family instructions: "
          + ", ".join(f"{v}: {c}" for v, c in sorted(per_variant.items(), key=str)))
    for title, names, counts in (
            ("outside the ISA variants (would run on any CPU)", stray, found),
            ("with AVX-512 instructions in the avx2 variant", avx512_in_avx2, avx512)):
        if names:
            print(f"FAIL: {len(names)} functions {title}:")
            for n in names:
                print(f"  {counts[n]:5d}  {n}")
    if stray or avx512_in_avx2:
        return 1
    print("ok: every AVX-family instruction is inside an ISA variant; avx2 has no AVX-512")
    return 0


if __name__ == "__main__":
    sys.exit(main())
