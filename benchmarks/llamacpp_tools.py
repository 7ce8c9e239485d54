"""Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) once, into a cache folder.

They come from the same llama.cpp sources as the llama-cpp-python that lowbit's tests use: the script downloads
that exact version's source distribution from the package index, takes its vendored llama.cpp, and builds only
the three tools (CPU, Release, static libraries). A second run finds them and does nothing. The tools are
benchmark equipment, never a dependency of lowbit.

    .venv/bin/python benchmarks/llamacpp_tools.py [--cache ~/.cache/lowbit] [--jobs 2]

prints the folder holding the binaries. Other benchmarks call `tools()`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
DEFAULT_CACHE = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _sdist(folder: Path, ver: str) -> Path:
    found = sorted(folder.glob(f"llama_cpp_python-{ver}.tar.gz"))
    if not found:
        print(f"[tools] downloading llama-cpp-python {ver}'s source distribution", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(folder)], check=True)
        found = sorted(folder.glob(f"llama_cpp_python-{ver}.tar.gz"))
    if not found:
        raise SystemExit(f"pip did not leave llama_cpp_python-{ver}.tar.gz in {folder}")
    return found[0]


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """The sdist's vendor/llama.cpp as dest/llama.cpp (extracted beside, then renamed: never half a tree)."""
    if (dest / "llama.cpp" / "CMakeLists.txt").exists():
        return dest / "llama.cpp"
    tmp = dest / "extract.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(tmp, members=members, filter="data")
    (src,) = tmp.glob("*/vendor/llama.cpp")
    src.rename(dest / "llama.cpp")
    shutil.rmtree(tmp)
    return dest / "llama.cpp"


def tools(cache: Path = DEFAULT_CACHE, jobs: int = 2) -> dict[str, Path]:
    """Paths of llama-quantize, llama-imatrix and llama-perplexity, built first if missing."""
    ver = version("llama_cpp_python")
    root = cache / f"llama.cpp-{ver}"
    bins = {name: root / "build" / "bin" / name for name in TOOLS}
    if all(p.is_file() for p in bins.values()):
        return bins
    root.mkdir(parents=True, exist_ok=True)
    src = _extract_llama_cpp(_sdist(root, ver), root)
    build = root / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"[tools] building {', '.join(TOOLS)} from llama.cpp in llama-cpp-python {ver} ({jobs} jobs)",
          file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                    "-DGGML_NATIVE=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(jobs)], check=True)
    missing = [n for n, p in bins.items() if not p.is_file()]
    if missing:
        raise SystemExit(f"the build finished without {', '.join(missing)} in {build / 'bin'}")
    return bins


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    bins = tools(args.cache, args.jobs)
    print(next(iter(bins.values())).parent)


if __name__ == "__main__":
    main()
