"""The machine the kernels are compiled for, and every choice that depends on it, in one place.

LLVM compiles Numba's kernels for the process's triple (llvmlite's get_process_triple) and for the
features Numba passes it: NUMBA_CPU_FEATURES when set, else the host's (Numba's codegen does the
same). From those two this module picks:

  the micro-kernel's shape (packed.py): vector width, rows of x and panels of Wh per call,
      sized so that ROWS x PANELS accumulators, PANELS panel vectors and a broadcast fit the
      target's vector registers:

      target     vector     registers  ROWS x PANELS  registers in use
      avx512     16 floats  32 zmm     8 x 2          16 + 2 + 1 = 19
      avx2       8 floats   16 ymm     6 x 2          12 + 2 + 1 = 15
      neon       4 floats   32 q       6 x 4          24 + 4 + 1 = 29  (fmla by element: x needs no splat)
      generic    4 floats   16         4 x 2          8 + 2 + 1 = 11   (SSE2, or any other machine)

      SVE machines take the NEON shape: Numba's kernels are fixed-width LLVM IR, which LLVM maps
      to SVE registers only when told the vector length at compile time
      (-aarch64-sve-vector-bits-min), and that length is the running machine's, not the
      compiler's, so a cached kernel could not carry it. NEON's 128 bits run on every SVE core.
  the spin-wait hint (barrier.py): x86 `pause`, AArch64 `yield`, nothing elsewhere.
  the call that gives a core away (barrier.py): sched_yield (POSIX) or SwitchToThread (Windows).

  the bfloat16 product (products.py): Dot (vdpbf16ps) where the features include avx512bf16 and
      not AMX (Zen 4/5, Cooper Lake), Widen (bfloat16 storage widened to float32 in registers)
      everywhere else. The choice is
      made here, from the features LLVM compiles for, before any kernel compiles, so no kernel is
      ever compiled for an instruction its CPU lacks. AMX tiles and ARM's BFDOT/BFMMLA are not
      built yet: AMX Xeons and BF16 ARM cores take Widen (docs/engine.md).

CHARLSTM_KERNEL_SHAPE=avx512|avx2|neon|generic forces a shape (for tests: every shape runs on any
x86-64 machine, since the IR is portable and LLVM legalises wider vectors into narrower ones).
"""
import ctypes
import os
import sys
from dataclasses import dataclass

import llvmlite.binding as llvm
from numba.core import config


@dataclass(frozen=True)
class KernelShape:
    name: str
    vector_bytes: int  # one vector register
    registers: int  # vector registers the instruction set names
    rows: int  # rows of x (streams) per micro-kernel call
    panels: int  # panels of Wh per call; divides 4, so a forward call holds whole gate groups

    @property
    def registers_used(self):
        return self.rows * self.panels + self.panels + 1  # accumulators, panel vectors, a broadcast


SHAPES = {
    "avx512": KernelShape("avx512", 64, 32, 8, 2),
    "avx2": KernelShape("avx2", 32, 16, 6, 2),
    "neon": KernelShape("neon", 16, 32, 6, 4),
    "generic": KernelShape("generic", 16, 16, 4, 2),
}


def architecture():
    """'x86_64', 'aarch64', ... : the first part of the triple LLVM compiles for."""
    arch = llvm.get_process_triple().split("-", 1)[0]
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def features():
    """The CPU features LLVM compiles for, as a set of names without their '+'."""
    text = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    return {f[1:] for f in text.split(",") if f.startswith("+")}


def choose_shape(arch, feature_names):
    """The micro-kernel's shape for an architecture and its feature names (pure, for tests)."""
    if arch == "x86_64":
        if "avx512f" in feature_names:
            return SHAPES["avx512"]
        if {"avx2", "fma"} <= feature_names:
            return SHAPES["avx2"]
    if arch == "aarch64":
        return SHAPES["neon"]  # NEON is part of ARMv8-A; SVE cores run it too (module docstring)
    return SHAPES["generic"]


def _shape():
    forced = os.environ.get("CHARLSTM_KERNEL_SHAPE")
    if forced:
        if forced not in SHAPES:
            raise ValueError(f"CHARLSTM_KERNEL_SHAPE={forced}: expected one of {', '.join(SHAPES)}")
        return SHAPES[forced]
    return choose_shape(architecture(), features())


SHAPE = _shape()

BF16_PRODUCTS = ("dot", "widen")


def choose_bf16_product(arch, feature_names):
    """'dot' or 'widen' for an architecture and its feature names (pure, for tests). An Intel core
    with AMX runs vdpbf16ps as 4 uops, at 0.5-0.9x its float32 fma (issue #32's measurements): there
    only AMX tiles would pay, and until they are built Widen's bytes are the gain."""
    if arch == "x86_64" and {"avx512f", "avx512bf16"} <= feature_names and "amx-bf16" not in feature_names:
        return "dot"
    return "widen"


def _bf16_product():
    """The machine's bfloat16 product; CHARLSTM_BF16_PRODUCT=widen forces the storage path (tests
    run it on a machine that has Dot). Forcing dot where the features lack avx512bf16 is refused:
    LLVM would be asked for an instruction the CPU cannot run."""
    best = choose_bf16_product(architecture(), features())
    forced = os.environ.get("CHARLSTM_BF16_PRODUCT")
    if forced:
        if forced not in BF16_PRODUCTS:
            raise ValueError(f"CHARLSTM_BF16_PRODUCT={forced}: expected one of {', '.join(BF16_PRODUCTS)}")
        if forced == "dot" and best != "dot":
            raise ValueError("CHARLSTM_BF16_PRODUCT=dot: this CPU has no avx512bf16")
        return forced
    return best


BF16_PRODUCT = _bf16_product()

# ---------------------------------------------------------------- spinning and yielding

# The spin-wait hint per architecture: an LLVM intrinsic and its i32 arguments (AArch64's hint #1 is
# `yield`). An architecture missing here gets none: an intrinsic LLVM cannot select for the target
# is an abort inside LLVM (`Cannot select`), not an exception.
SPIN_HINTS = {"x86_64": ("llvm.x86.sse2.pause", ()), "aarch64": ("llvm.aarch64.hint", (1,))}
ARCH = architecture()

YIELD_SYMBOL = "charlstm_yield_core"  # kernels call this name; it is bound below to the OS's call


def _bind_yield():
    """Bind YIELD_SYMBOL to sched_yield (POSIX) or SwitchToThread (Windows), both `int f(void)`,
    so kernels call one name on every OS, and a kernel loaded from the disk cache links it afresh
    (this runs when barrier.py is imported, before any of its kernels load). False if the OS has
    neither: kernels then only spin."""
    try:
        if sys.platform == "win32":
            address = ctypes.cast(ctypes.windll.kernel32.SwitchToThread, ctypes.c_void_p).value
        else:
            address = ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    llvm.add_symbol(YIELD_SYMBOL, address)
    return True


CAN_YIELD = _bind_yield()
