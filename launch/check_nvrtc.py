"""Compile every kernel family with NVRTC, as the runtime does, where there is no GPU (CI).

    python launch/check_nvrtc.py                 # every family of compile.FAMILIES
    python launch/check_nvrtc.py decode context  # only these families (all_reduce: the custom all-reduce)

``launch/check_kernels`` compiles with nvcc, which is not what runs: the runtime hands the sources to
NVRTC (``cupy.RawModule``), which has no C library headers (no ``<stdint.h>``, no ``<math.h>``) and
treats unannotated functions differently. Two kernels that nvcc accepted failed on a GPU machine for
exactly that. This script compiles each family's covering set of variants (the name expressions of
``launch/kernel_instances.py``) with NVRTC through ``cuda.bindings.nvrtc`` (the ``dev`` extra),
with the options of ``compile.kernel_options`` for the family's architecture (sm_90 where the
family names none) plus the two CuPy adds (flushed denormals; device as the default execution
space), and CUDA's headers from the nvcc installation (or CUDA_INCLUDE, CUDA_HOME).
Exits non-zero when any family fails or NVRTC prints a warning; when ``cuda.bindings`` is not
installed it says so and exits 0 (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402
import kernel_instances  # noqa: E402

from tp_runtime.backends import compile as kc  # noqa: E402
from tp_runtime.distributed import custom_all_reduce  # noqa: E402
from tp_runtime.resources import kernels_dir  # noqa: E402

DEFAULT_ARCH = "sm_90"
CUPY_ADDS = ("-ftz=true", "--device-as-default-execution-space")


def cuda_include() -> str:
    """CUDA's include folder (the one holding cuda_fp16.h): $CUDA_INCLUDE, else beside nvcc, $CUDA_HOME,
    /usr/local/cuda, or the NVIDIA wheels' folder."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_INCLUDE"), os.environ.get("CUDA_HOME") and f"{os.environ['CUDA_HOME']}/include"]
    candidates += [str(Path(nvcc).resolve().parent.parent / "include")] if nvcc else []
    candidates += ["/usr/local/cuda/include", *(str(Path(p) / "nvidia" / "cu13" / "include") for p in sys.path)]
    for folder in filter(None, candidates):
        if (Path(folder) / "cuda_fp16.h").is_file():
            return folder
    raise SystemExit("check_nvrtc: CUDA's headers (cuda_fp16.h) not found; set CUDA_INCLUDE")


def sources() -> dict[str, tuple[str, tuple[str, ...], list[str]]]:
    """{name: (source file, NVRTC options, name expressions)}: every family of compile.FAMILIES (its
    covering set of variants, compile.kernel_options for its architecture) and the custom all-reduce,
    which distributed/ compiles itself with its own options."""
    table = {
        family: (fam.source, kc.kernel_options(fam.arch or DEFAULT_ARCH), kernel_instances.covering_set(family))
        for family, fam in kc.FAMILIES.items()
    }
    table["all_reduce"] = (
        "all_reduce.cu",
        custom_all_reduce.compile_options(DEFAULT_ARCH),
        list(custom_all_reduce.kernel_names().values()),
    )
    return table


def compile_source(nvrtc, source_file: str, options: tuple[str, ...], exprs: list[str]) -> str | None:
    """NVRTC's complaint about ``source_file`` with ``exprs`` instantiated (errors or warnings), or None."""
    flags = [*options, f"-I{cuda_include()}", *CUPY_ADDS]
    source = (kernels_dir() / source_file).read_text()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), source_file.encode(), 0, [], [])
    for expr in exprs:
        nvrtc.nvrtcAddNameExpression(prog, expr.encode())
    (result,) = nvrtc.nvrtcCompileProgram(prog, len(flags), [o.encode() for o in flags])
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    text = log.decode(errors="replace").strip("\x00 \n")
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return text or str(result)
    return text or None


def main(argv: list[str]) -> int:
    table = sources()
    p = cli.parser(__doc__)
    p.add_argument("families", nargs="*", help=f"default: all of {', '.join(table)}")
    families = p.parse_args(argv).families or list(table)
    unknown = [f for f in families if f not in table]
    if unknown:
        p.error(f"families: unknown {unknown} (known: {list(table)})")
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        print("check_nvrtc: cuda.bindings is not installed (pip install cuda-bindings nvidia-cuda-nvrtc): skipped")
        return 0
    failed = 0
    for family in families:
        source_file, options, exprs = table[family]
        complaint = compile_source(nvrtc, source_file, options, exprs)
        arch = next(o for o in options if o.startswith("-arch=")).removeprefix("-arch=")
        if complaint is None:
            print(f"ok      {family} (NVRTC, {arch})")
        else:
            print(f"FAILED  {family} (NVRTC, {arch}):\n{complaint}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
