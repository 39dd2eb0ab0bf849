"""Check a repaired decoupleq wheel: what .ci/wheel promises about it, before it is installed.

Usage: python .ci/check_wheel.py WHEEL   (needs pyelftools, which auditwheel brings)

- the platform tag is manylinux and the file is at most MAX_MB;
- every ELF file has no run-time search path outside the package (only ``$ORIGIN``-relative
  RPATH/RUNPATH entries) and no symbol table or debug sections (stripped);
- the project's licence (Apache-2.0) is in the .dist-info and the vendored OpenBLAS's
  licence file is beside the library.
"""
import io
import logging
import os
import sys
import zipfile

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

MAX_MB = 10.0
log = logging.getLogger("check_wheel")


def elf_problems(name: str, data: bytes) -> list:
    """What is wrong with one ELF file of the wheel (empty when nothing)."""
    elf = ELFFile(io.BytesIO(data))
    problems = []
    for section in elf.iter_sections():
        if section.name == ".symtab" or section.name.startswith(".debug"):
            problems.append(f"{name}: not stripped (section {section.name})")
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                if tag.entry.d_tag in ("DT_RPATH", "DT_RUNPATH"):
                    value = tag.runpath if tag.entry.d_tag == "DT_RUNPATH" else tag.rpath
                    for entry in value.split(":"):
                        if not entry.startswith("$ORIGIN"):
                            problems.append(f"{name}: {tag.entry.d_tag} entry {entry!r} is outside the package")
    return problems


def check(path: str) -> list:
    problems = []
    base = os.path.basename(path)
    if "manylinux" not in base:
        problems.append(f"{base}: not tagged manylinux")
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > MAX_MB:
        problems.append(f"{base}: {size_mb:.1f} MB, over {MAX_MB} MB")
    n_elf = 0
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        for name in names:
            data = zf.read(name)
            if data[:4] == b"\x7fELF":
                n_elf += 1
                problems += elf_problems(name, data)
        licences = [n for n in names if ".dist-info/licenses/" in n]
        apache = [n for n in licences if b"Apache License" in zf.read(n) and b"Version 2.0" in zf.read(n)]
        if not apache:
            problems.append(f"{base}: no Apache-2.0 LICENSE in .dist-info/licenses ({licences})")
        blas = "decoupleq/libscipy_openblas.LICENSE.txt"
        if blas not in names or b"OpenBLAS" not in zf.read(blas):
            problems.append(f"{base}: no OpenBLAS licence at {blas}")
    if n_elf < 2:
        problems.append(f"{base}: {n_elf} ELF files, expected the extension and the vendored OpenBLAS")
    log.info("%s: %.2f MB, %d ELF files, licences %s", base, size_mb, n_elf, licences)
    return problems


def main(argv) -> int:
    logging.basicConfig(level=logging.INFO, format="check_wheel: %(message)s")
    if len(argv) != 2:
        log.error("usage: check_wheel.py WHEEL")
        return 2
    problems = check(argv[1])
    for p in problems:
        log.error("%s", p)
    if not problems:
        log.info("all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
