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
    wanted: dict[str | None, set[str]] = defaultdict(set)  # library (by version name) -> names
    for p in torch_libs:
        for binding, ndx, name in dynamic_symbols(p):
            base, _, version = name.partition("@")
            if ndx != "UND":
                defined.add(base)
            elif binding == "GLOBAL":
                wanted[version or None].add(base)
    # Unversioned imports could come from any missing library: every stub defines them.
    unversioned = wanted[None] - defined
    with tempfile.TemporaryDirectory() as tmp:
        source, script = Path(tmp) / "stub.c", Path(tmp) / "version.map"
        for name in missing:
            functions = sorted(wanted.get(name, set()) | unversioned)
            source.write_text("".join(f"int {f}(void) {{ return 100; }}\n" for f in functions))
            script.write_text(f"{name} {{ global: *; }};\n")  # torch asks for e.g. @libcudart.so.12
            subprocess.run(
                ["gcc", "-shared", "-fPIC", "-o", str(lib / name), str(source),
                 f"-Wl,-soname,{name}", f"-Wl,--version-script={script}"],
                check=True,
            )  # fmt: skip
    print(f"cuda_stubs: {len(missing)} stub libraries in {lib}: {' '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
