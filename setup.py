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


def _load_emu_build():
    """dalle_kernels/_emu_build.py, by path (the package itself is not importable before it is built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dalle_kernels_emu_build", ROOT / "dalle_kernels" / "_emu_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_emu_build = _load_emu_build()
emu_transform = _emu_build.emu_transform


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
        cxx = os.environ.get("CXX", "c++")
        lines = [
            f"cxx = {cxx}",
            f"cflags = {_emu_build.common_flags(includes)}",
            f"emuflags = {_emu_build.kernel_flags(includes, ROOT / 'csrc' / 'cuda_emu.h')}",
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
