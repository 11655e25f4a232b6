"""The engine's choices per target (engine/target.py): the micro-kernel's shape for each
architecture, the spin-wait hint compiled by LLVM for the architecture that gets it, and every
shape's kernels right on this machine (forced shapes, checked by the kernel tests in a child)."""
import os
import subprocess
import sys

import llvmlite.binding as llvm
import pytest
from llvmlite import ir

from charlstm.engine import barrier, target

SHAPE_CASES = [
    ("x86_64", {"sse2", "avx512f", "avx2", "fma"}, "avx512"),
    ("x86_64", {"sse2", "avx", "avx2", "fma"}, "avx2"),
    ("x86_64", {"sse2", "avx"}, "generic"),  # no fma: AVX without FMA3 (Sandy Bridge)
    ("aarch64", {"neon"}, "neon"),
    ("aarch64", {"neon", "sve", "sve2"}, "neon"),  # fixed-width IR runs as NEON on SVE cores
    ("powerpc64le", {"altivec", "vsx"}, "generic"),
]


@pytest.mark.parametrize("arch,features,expected", SHAPE_CASES)
def test_each_architecture_gets_its_shape(arch, features, expected):
    assert target.choose_shape(arch, features).name == expected


@pytest.mark.parametrize("shape", list(target.SHAPES.values()), ids=list(target.SHAPES))
def test_each_shape_fits_its_registers(shape):
    assert shape.registers_used <= shape.registers
    assert 4 % shape.panels == 0  # a forward call holds whole groups of the 4 gates
    assert 1 <= shape.rows <= 8  # packed.block_product has entry points for 1..8 rows


TRIPLES = {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu",
           "powerpc64le": "powerpc64le-unknown-linux-gnu"}
HINT_INSTRUCTIONS = {"x86_64": "pause", "aarch64": "yield", "powerpc64le": None}


@pytest.mark.parametrize("arch", list(TRIPLES))
def test_spin_hint_compiles_for_its_architecture(arch):
    """barrier.py's hint for each architecture, compiled by LLVM for that architecture: a hint of
    another (x86's pause on ARM) is an abort inside LLVM, which is what this guards against."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    module = ir.Module(name="spin")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), []), name="spin_once")
    builder = ir.IRBuilder(fn.append_basic_block())
    barrier.emit_spin_hint(builder, arch)
    builder.ret_void()
    parsed = llvm.parse_assembly(str(module))
    parsed.triple = TRIPLES[arch]
    assembly = llvm.Target.from_triple(TRIPLES[arch]).create_target_machine().emit_assembly(parsed)
    if HINT_INSTRUCTIONS[arch]:
        assert HINT_INSTRUCTIONS[arch] in assembly.split()
    else:
        assert arch not in target.SPIN_HINTS


def test_this_machine_binds_a_yield():
    assert target.CAN_YIELD  # sched_yield on POSIX, SwitchToThread on Windows: every OS we run on has one


def test_forced_shape_name_is_checked():
    env = {**os.environ, "CHARLSTM_KERNEL_SHAPE": "sse9"}
    done = subprocess.run([sys.executable, "-c", "import charlstm.engine.target"], env=env, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "expected one of avx512, avx2, neon, generic" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("shape", [s for s in target.SHAPES if s != target.SHAPE.name])
def test_kernels_right_in_every_shape(shape, tmp_path):
    """The kernel tests (reference equality, the micro-kernels against NumPy, one-stream splits)
    with another shape forced, in a cache that already holds this machine's own shape: each shape
    gets its own cache entries (jit._SoftCache keys them by shape), never another's kernels."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    native = [sys.executable, "-m", "charlstm", "gradcheck", "--hidden", "5", "--layers", "2", "--batch-size", "3"]
    assert subprocess.run(native, env=env, cwd=root, capture_output=True).returncode == 0
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels.py",
                           "tests/test_gradcheck.py"], env={**env, "CHARLSTM_KERNEL_SHAPE": shape}, cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
