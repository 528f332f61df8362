"""The emulation build's source rewriting and compiler flags (stdlib only): used by setup.py, which loads this file
by path before the package is installed, and by dalle_kernels.emu_mutations, which rebuilds mutated copies of one
translation unit with the same rewriting and flags."""
import re
import shlex


# Host-compiler flags of the kernel sources (ThreadSanitizer's instrumentation, whose __tsan_* hooks
# csrc/emu/runtime.cpp implements; -g1: line tables, so that reports name source lines) and of the rest.
def common_flags(includes):
    inc = " ".join(f"-I{shlex.quote(str(i))}" for i in includes)
    return (f"-O2 -std=c++17 -fPIC -fvisibility=hidden -fno-strict-aliasing -ffp-contract=off "
            f"-DDALLE_CUDA_EMU=1 -DDALLE_EXTENSION_NAME=_C_emu {inc}")


def kernel_flags(includes, emu_header):
    return (f"{common_flags(includes)} -g1 -fsanitize=thread --param=tsan-instrument-func-entry-exit=0 "
            f"-include {shlex.quote(str(emu_header))}")


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
