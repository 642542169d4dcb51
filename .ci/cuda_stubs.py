"""Let a CUDA build of torch from PyPI import on a CPU-only machine without its nvidia-* wheels.

PyPI has no CPU-only torch wheels for Linux x86_64: every release there is a CUDA build whose
libraries link against ~15 CUDA libraries shipped as nvidia-* wheels (about 2 GB to
download for torch 2.3, 3 GB installed). The tox envs that test other torch releases install
the torch wheel alone (``pip install --no-deps``, ~750 MB) and run this script, which
compiles, next to torch's own libraries (their RPATH includes ``$ORIGIN``), one stub for
every CUDA library they need and lack. A stub defines each function torch imports from
that library as returning 100, ``cudaErrorNoDevice`` (any nonzero status is an error for the
other libraries), so that torch imports, ``torch.cuda.is_available()`` is False, and every
CPU code path runs the real torch code. Needs gcc and readelf (binutils). Idempotent.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# Libraries the system provides (or torch ships): never stubbed.
SYSTEM = re.compile(
    r"^(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|ld-linux.*|libgomp)\.so"
)


def dynamic_symbols(path: Path) -> list[tuple[str, str, str]]:
    """(binding, section index, name@version) of every dynamic symbol of ``path``."""
    out = subprocess.run(
        ["readelf", "--dyn-syms", "--wide", str(path)], capture_output=True, text=True, check=True
    ).stdout
    fields = (line.split() for line in out.splitlines())
    return [(f[4], f[6], f[7]) for f in fields if len(f) >= 8 and f[0].endswith(":")]


def needed(path: Path) -> set[str]:
    out = subprocess.run(
        ["readelf", "--dynamic", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]", out))


def version_files(path: Path) -> dict[str, str]:
    """Each symbol version ``path`` asks for (``libcudart.so.12``, ``NVSHMEM``) -> its library."""
    out = subprocess.run(
        ["readelf", "--version-info", "--wide", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    versions, library = {}, ""
    for line in out.splitlines():
        if m := re.search(r"File: (\S+)", line):
            library = m.group(1)
        elif (m := re.search(r"Name: (\S+)\s+Flags", line)) and library:
            versions[m.group(1)] = library
    return versions


def system_symbols(torch_libs: list[Path]) -> set[str]:
    """Names the system libraries define, found with ldd on one of torch's libraries."""
    out = subprocess.run(["ldd", str(torch_libs[0])], capture_output=True, text=True).stdout
    paths = re.findall(r"=> (/\S+)", out)
    return {
        name.split("@")[0]
        for p in paths
        if SYSTEM.match(Path(p).name)
        for _, ndx, name in dynamic_symbols(Path(p))
        if ndx != "UND"
    }


def main() -> int:
    spec = importlib.util.find_spec("torch")  # not imported: it cannot load before the stubs
    if spec is None or spec.origin is None:
        print("cuda_stubs: torch is not installed", file=sys.stderr)
        return 1
    lib = Path(spec.origin).parent / "lib"
    torch_libs = sorted(lib.glob("*.so*"))
    missing = sorted(
        {
            name
            for p in torch_libs
            for name in needed(p)
            if not SYSTEM.match(name) and not (lib / name).exists()
        }
    )
    if not missing:
        print(f"cuda_stubs: nothing to do in {lib}")
        return 0
    defined = system_symbols(torch_libs)
    # library -> each symbol version torch asks it for -> the names imported with it
    wanted: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    unversioned: set[str] = set()
    for p in torch_libs:
        files = version_files(p)
        for version, library in files.items():
            wanted[library][version]  # a version asked for defines no symbol
        for binding, ndx, name in dynamic_symbols(p):
            base, _, version = name.partition("@")
            if ndx != "UND":
                defined.add(base)
            elif binding == "GLOBAL" and version in files:
                wanted[files[version]][version].add(base)
            elif binding == "GLOBAL" and not version:
                unversioned.add(base)
    # Unversioned imports could come from any missing library: every stub defines them.
    unversioned -= defined
    with tempfile.TemporaryDirectory() as tmp:
        source, script = Path(tmp) / "stub.c", Path(tmp) / "version.map"
        for name in missing:
            versions = wanted.get(name, {})
            functions = sorted(set().union(unversioned, *versions.values()))
            source.write_text("".join(f"int {f}(void) {{ return 100; }}\n" for f in functions))
            command = ["gcc", "-shared", "-fPIC", "-o", str(lib / name), str(source)]
            if versions:  # one node per version torch asks for; the last one takes the rest
                names = [[f"{f};" for f in sorted(fs)] for fs in versions.values()]
                names[-1].append("*;")
                script.write_text(
                    "".join(
                        f"{v} {{ global: {' '.join(n)} }};\n" if n else f"{v} {{ }};\n"
                        for v, n in zip(versions, names, strict=True)
                    )
                )
                command.append(f"-Wl,--version-script={script}")
            subprocess.run([*command, f"-Wl,-soname,{name}"], check=True)
    print(f"cuda_stubs: {len(missing)} stub libraries in {lib}: {' '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
