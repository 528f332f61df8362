"""Build and install dalle_kernels (the kernels) and dalle (the thin model and trainer in python/).

The CUDA extension ``dalle_kernels._C`` is built from ``csrc/`` with nvcc and ninja when a CUDA compiler
is found. ``dalle_kernels._C_emu`` is the same ``.cu`` sources compiled by the host C++ compiler against
``csrc/cuda_emu.h``: the kernels run on the CPU under CUDA's execution model (``backend="cuda_emu"``).
Environment:
  DALLE_KERNELS_CUDA=0|1        force the CUDA build off / on (on: a missing nvcc or a failed build is an error)
  DALLE_KERNELS_CUDA_EMU=1      also build the emulation extension (needs the toolkit's headers, not a GPU)
  DALLE_KERNELS_CUDA_ARCHS      semicolon-separated SM versions, default "80;90"
  CUDA_HOME                     toolkit root (default: from the nvcc on the PATH, else /usr/local/cuda)
Without the extension the package imports and works (Triton and PyTorch backends).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_FLAG = os.environ.get("DALLE_KERNELS_CUDA", "").strip()
EMU_FLAG = os.environ.get("DALLE_KERNELS_CUDA_EMU", "").strip()


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def cuda_home(nvcc):
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return Path(home)
    real = Path(nvcc).resolve()
    if real.parent.name == "bin" and (real.parent.parent / "include" / "cuda_runtime.h").exists():
        return real.parent.parent
    return Path("/usr/local/cuda")


def cuda_archs():
    archs = os.environ.get("DALLE_KERNELS_CUDA_ARCHS", "80;90")
    out = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not out or not all(a.rstrip("a").isdigit() for a in out):
        raise SystemExit(f"DALLE_KERNELS_CUDA_ARCHS must look like '80;90', got {archs!r}")
    return out


class CUDAExtension(Extension):
    """Marker: sources under csrc/ compiled by nvcc (.cu) and the host compiler (.cpp)."""


class EmuExtension(Extension):
    """Marker: the .cu sources compiled by the host compiler for the CPU emulator (csrc/cuda_emu.h)."""


def _blank_comments(src):
    """``src`` with comments replaced by spaces (newlines kept, so line numbers stay), string literals untouched."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i:j + 1])
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in src[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _split_top_level(text, sep=","):
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


_ALIGN = re.compile(r"(?:__align__|alignas)\s*\(\s*([^)]*)\)")


def emu_transform(src, path):
    """Rewrite what a host compiler cannot parse in a .cu file, keeping every line where it was:

    ``k<<<g, b, s, st>>>(args)``          -> ``k ^ ::cuda_emu::config("k", g, b, s, st)(args)``
    ``extern __shared__ T name[];``       -> ``T* const name = (T*)::cuda_emu::dynamic_shared();``
    ``__shared__ T a[N], b;``             -> per-block variables in the emulator's shared-memory arena.
    Everything else is compiled as written (csrc/cuda_emu.h supplies the CUDA built-ins).
    """
    src = _blank_comments(src)

    def launch(m):
        name = " ".join(m.group("k").split())
        return f'{m.group("k")} ^ ::cuda_emu::config("{name}", {m.group("cfg")})'

    src = re.sub(r"(?P<k>[A-Za-z_][\w:]*(?:\s*<[^<>;]*>)?)\s*<<<(?P<cfg>.*?)>>>", launch, src, flags=re.S)
    if "<<<" in src:
        raise ValueError(f"{path}: a kernel launch the emulation build cannot rewrite (nested template arguments?)")

    def dynamic(m):
        ctype = " ".join(_ALIGN.sub("", m.group("type")).split())
        return f"{ctype}* const {m.group('name')} = static_cast<{ctype}*>(::cuda_emu::dynamic_shared());"

    src = re.sub(r"\bextern\s+__shared__\s+(?P<type>[^;]*?)\s*\b(?P<name>\w+)\s*\[\s*\]\s*;", dynamic, src)
    counter = [0]

    def static(m):
        body = m.group("body")
        align = _ALIGN.search(body)
        body = _ALIGN.sub("", body)
        decls = _split_top_level(body)
        first = re.match(r"^(?P<type>.*?)\b(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", decls[0].strip(), re.S)
        if first is None or not first.group("type").strip():
            raise ValueError(f"{path}: cannot parse the __shared__ declaration {m.group(0)!r}")
        ctype = " ".join(first.group("type").split())
        out = []
        for i, d in enumerate(decls):
            dm = first if i == 0 else re.match(r"^\s*(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", d)
            if dm is None:
                raise ValueError(f"{path}: cannot parse the __shared__ declarator {d!r}")
            site = f"cuda_emu_site_{counter[0]}"
            counter[0] += 1
            dims = "".join(dm.group("dims").split())
            out.append(f"static ::cuda_emu::SharedSite {site}; auto& {dm.group('name')} = "
                       f"::cuda_emu::shared_var<{ctype}{dims}>({site}, {align.group(1) if align else 0});")
        return " ".join(out) + "\n" * m.group(0).count("\n")

    src = re.sub(r"\b__shared__\s+(?P<body>[^;]*);", static, src)
    return f'#line 1 "{path}"\n' + src


def find_cuda_headers():
    """The CUDA toolkit's include directory (cuda_fp16.h and friends), or None."""
    nvcc = find_nvcc()
    for home in ([cuda_home(nvcc)] if nvcc else []) + [Path("/usr/local/cuda")]:
        if (home / "include" / "cuda_fp16.h").exists():
            return home / "include"
    return None


class BuildExt(build_ext):
    """Compile CUDAExtension sources with a generated ninja file (parallel, incremental)."""

    def build_extension(self, ext):
        if isinstance(ext, EmuExtension):
            try:
                return self._build_emu(ext)
            except Exception as exc:  # noqa: BLE001 - report and decide by DALLE_KERNELS_CUDA_EMU
                if EMU_FLAG == "1":
                    raise
                print(f"WARNING: building the CUDA emulation extension failed ({exc})", file=sys.stderr)
                return None
        if not isinstance(ext, CUDAExtension):
            return super().build_extension(ext)
        try:
            self._build_cuda(ext)
        except Exception as exc:  # noqa: BLE001 - report and decide by DALLE_KERNELS_CUDA
            if CUDA_FLAG == "1":
                raise
            print(f"WARNING: building the optional CUDA extension failed ({exc}); "
                  "dalle_kernels will use its Triton and PyTorch backends.", file=sys.stderr)

    def _ninja(self, tmp, lines, what):
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg
                ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
            except ImportError as exc:
                raise RuntimeError("ninja is needed to build the CUDA extensions (pip install ninja)") from exc
        jobs = os.environ.get("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
        print(what, file=sys.stderr)
        subprocess.run([ninja, "-C", str(tmp), "-j", jobs], check=True)

    def _build_emu(self, ext):
        """Host-compile the .cu files for the emulator: rewritten by emu_transform, instrumented with
        -fsanitize=thread (whose __tsan_* hooks csrc/emu/runtime.cpp implements: no ThreadSanitizer runtime)."""
        import pybind11

        headers = find_cuda_headers()
        if headers is None:
            raise RuntimeError("the CUDA toolkit headers (cuda_fp16.h) were not found; set CUDA_HOME")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "cuda_emu"
        (tmp / "gen").mkdir(parents=True, exist_ok=True)
        includes = [sysconfig.get_paths()["include"], pybind11.get_include(), str(headers), str(ROOT / "csrc")]
        inc = " ".join(f"-I{shlex.quote(i)}" for i in includes)
        cxx = os.environ.get("CXX", "c++")
        common = (f"-O2 -std=c++17 -fPIC -fvisibility=hidden -fno-strict-aliasing -ffp-contract=off "
                  f"-DDALLE_CUDA_EMU=1 -DDALLE_EXTENSION_NAME=_C_emu {inc}")
        lines = [
            f"cxx = {cxx}",
            f"cflags = {common}",
            f"emuflags = {common} -fsanitize=thread --param=tsan-instrument-func-entry-exit=0 "
            f"-include {shlex.quote(str(ROOT / 'csrc' / 'cuda_emu.h'))}",
            "rule cxx\n  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            "rule emu\n  command = $cxx -MMD -MF $out.d $emuflags -x c++ -c $in -o $out\n  depfile = $out.d\n"
            "  deps = gcc",
            "rule link\n  command = $cxx $in -shared -lpthread -ldl -o $out",
        ]
        objs = []
        for src in ext.sources:
            src = (ROOT / src).resolve()
            rel = src.relative_to(ROOT / "csrc")
            obj = tmp / (str(rel).replace("/", "_") + ".o")
            if src.suffix == ".cu":
                gen = tmp / "gen" / (str(rel).replace("/", "_") + ".cc")
                text = emu_transform(src.read_text(), str(src))
                if not gen.exists() or gen.read_text() != text:  # unchanged sources stay up to date for ninja
                    gen.write_text(text)
                lines.append(f"build {obj}: emu {gen}")
            else:
                lines.append(f"build {obj}: cxx {src}")
            objs.append(str(obj))
        lines.append(f"build {out}: link {' '.join(objs)}")
        self._ninja(tmp, lines, f"building {ext.name} (CUDA kernels on the CPU) with {cxx}")

    def _build_cuda(self, ext):
        import pybind11

        nvcc = find_nvcc()
        home = cuda_home(nvcc)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "cuda"
        tmp.mkdir(parents=True, exist_ok=True)
        includes = [sysconfig.get_paths()["include"], pybind11.get_include(), str(home / "include"),
                    str(ROOT / "csrc")]
        inc = " ".join(f"-I{shlex.quote(i)}" for i in includes)
        gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs())
        last = cuda_archs()[-1]
        gencode += f" -gencode=arch=compute_{last},code=compute_{last}"  # PTX for newer GPUs
        cxx = os.environ.get("CXX", "c++")
        lines = [
            f"nvcc = {shlex.quote(nvcc)}",
            f"cxx = {cxx}",
            f"cflags = -O3 -std=c++17 -fPIC -fvisibility=hidden {inc}",
            f"nvflags = -O3 -std=c++17 {gencode} --threads 0 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
            f"--expt-relaxed-constexpr -lineinfo {inc}",
            f"ldflags = -shared -L{shlex.quote(str(home / 'lib64'))} -lcudart_static -ldl -lrt -lpthread",
            "rule cxx\n  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            "rule nvcc\n  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            "rule link\n  command = $cxx $in $ldflags -o $out",
        ]
        objs = []
        for src in ext.sources:
            src = (ROOT / src).resolve()
            obj = tmp / (src.name + ".o")
            rule = "nvcc" if src.suffix == ".cu" else "cxx"
            lines.append(f"build {obj}: {rule} {src}")
            objs.append(str(obj))
        lines.append(f"build {out}: link {' '.join(objs)}")
        self._ninja(tmp, lines, f"building {ext.name} for sm_{', sm_'.join(cuda_archs())} with {nvcc}")


def extensions():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*")
                     if p.suffix in (".cu", ".cpp"))
    exts = []
    if EMU_FLAG == "1":
        if find_cuda_headers() is None:
            raise SystemExit("DALLE_KERNELS_CUDA_EMU=1 but the CUDA toolkit headers were not found (set CUDA_HOME)")
        emu_only = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "emu").glob("*.c*")
                          if p.suffix in (".cu", ".cpp"))
        exts.append(EmuExtension("dalle_kernels._C_emu", sources + emu_only))
    if CUDA_FLAG == "0" or not sources:
        return exts
    if find_nvcc() is None:
        if CUDA_FLAG == "1":
            raise SystemExit("DALLE_KERNELS_CUDA=1 but no nvcc was found (set CUDA_HOME or put nvcc on the PATH)")
        print("WARNING: no CUDA compiler found; building dalle_kernels without its CUDA extension.",
              file=sys.stderr)
        return exts
    return exts + [CUDAExtension("dalle_kernels._C", sources)]


setup(
    name="dalle_kernels",
    version="0.1.0",
    description="Block-sparse attention, logit-Laplace loss and PowerSGD kernels for DALL-E-style training",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dalle_kernels", "dalle_kernels.*"])
    + find_packages("python", include=["dalle", "dalle.*"]),
    package_dir={"dalle": "python/dalle"},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system=='Linux'", "numpy", "tokenizers>=0.15",
                      "pillow", "tqdm", "safetensors>=0.4", "webdataset>=1.0"],
    # scikit-image: the photos of the real-data tests; attrs and requests: what the dall-e package (installed
    # without its requirements, .ci/run) imports, to test DVAE.from_openai against it
    extras_require={"test": ["pytest", "pytest-benchmark", "scikit-image", "attrs", "requests"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
