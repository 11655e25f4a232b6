"""What one k of the micro-kernel does (packed.emit_block_product), per precision and target.

The micro-kernel keeps ROWS x PANELS vectors of float accumulators; per k it loads a row of each
panel, broadcasts an entry of each row of x, and multiply-adds. Only the element types differ:

    Float   x and w float32 (or float64): w's row is one vector, fma.
    Widen   bfloat16 storage (every target): w holds bfloat16 bits (uint16), W of them a row, widened
            to float32 in registers (a bfloat16 is a float32's upper half: zero-extend, shift by 16);
            x is float32 holding values already rounded to bfloat16. fma in float32. Halves the
            bytes a weight costs; the arithmetic is Float's.
    Dot     AVX512_BF16's vdpbf16ps (Zen 4/5; Intel without AMX): x and w both bfloat16 bits, taken
            in pairs along k. A panel row holds pairs (k, k+1) of its W units interleaved,
            w[k2, j, e] = element (2*k2 + e, j), one 64-byte vector for W = 16; x's pair is one
            32-bit broadcast. One instruction does 2W multiply-adds into W float32 lanes, each
            lane adding product 2*k2+1 then 2*k2 (Intel's definition; tests/bf16_reference.py
            emulates that order), products exact, denormals flushed. K counts elements and must
            be even (bfloat16 operands are padded to an even length).

Dot is emitted as inline assembly: LLVM's intrinsic took i32 vectors up to LLVM 16 and bfloat
vectors from 17, which llvmlite's IR builder cannot name; the instruction is the same everywhere.
It is only ever compiled where the CPU has it (target.bf16_product decides, before any kernel
compiles).
"""
import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils

I64 = ir.IntType(64)
# LLVM assembles inline assembly with the target's asm parser, which Numba does not load
# (without it: "LLVM ERROR: Inline asm not supported by this streamer", an abort).
llvm.initialize_native_asmparser()


def splat(builder, scalar, n):
    """<n x type> with every lane `scalar`."""
    vty = ir.VectorType(scalar.type, n)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


class Float:
    """x and w of one float dtype, one fma per k."""

    def __init__(self, context, x_type, vector_bytes):
        self.fty = context.get_value_type(x_type.dtype)
        self.size = x_type.dtype.bitwidth // 8  # bytes of one accumulator lane
        self.W = vector_bytes // self.size
        self.vty = ir.VectorType(self.fty, self.W)

    def steps(self, builder, K):
        """The k loop's trip count for K elements of a row of x."""
        return K

    def load_panel(self, builder, panel, k):
        """Row k of a panel, as the multiply-add's w operand."""
        at = builder.gep(panel, [builder.mul(k, ir.Constant(I64, self.W))])
        return builder.load(builder.bitcast(at, self.vty.as_pointer()), align=self.size)

    def load_x(self, builder, row, k):
        """Entry k of a row of x, broadcast."""
        return splat(builder, builder.load(builder.gep(row, [k])), self.W)

    def madd(self, builder, x, w, acc):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vty, [self.vty] * 3),
                                             f"llvm.fma.v{self.W}f{self.size * 8}")
        return builder.call(fma, [x, w, acc])


class Widen(Float):
    """float32 x, bfloat16 w widened in registers (module docstring)."""

    def load_panel(self, builder, panel, k):
        bits = ir.VectorType(ir.IntType(16), self.W)
        at = builder.gep(panel, [builder.mul(k, ir.Constant(I64, self.W))])
        wide = builder.zext(builder.load(builder.bitcast(at, bits.as_pointer()), align=2),
                            ir.VectorType(ir.IntType(32), self.W))
        return builder.bitcast(builder.shl(wide, splat(builder, ir.Constant(ir.IntType(32), 16), self.W)), self.vty)


class Dot(Float):
    """bfloat16 x and w in pairs along k, vdpbf16ps (module docstring)."""

    def __init__(self, context, x_type, vector_bytes):
        self.fty, self.size = ir.FloatType(), 4
        self.W = vector_bytes // 4
        self.vty = ir.VectorType(self.fty, self.W)
        self.pairs = ir.VectorType(ir.IntType(32), self.W)

    def steps(self, builder, K):
        return builder.ashr(K, ir.Constant(I64, 1))

    def load_panel(self, builder, panel, k):
        at = builder.gep(panel, [builder.mul(k, ir.Constant(I64, 2 * self.W))])
        return builder.load(builder.bitcast(at, self.pairs.as_pointer()), align=2)

    def load_x(self, builder, row, k):
        at = builder.gep(row, [builder.mul(k, ir.Constant(I64, 2))])
        return splat(builder, builder.load(builder.bitcast(at, ir.IntType(32).as_pointer()), align=2), self.W)

    def madd(self, builder, x, w, acc):
        # AT&T order: vdpbf16ps src2, src1, dst; dst += pairs of src1 times pairs of src2
        asm = ir.InlineAsm(ir.FunctionType(self.vty, [self.vty, self.pairs, self.pairs]),
                           "vdpbf16ps $3, $2, $0", "=v,0,v,v")
        return builder.call(asm, [acc, w, x])


def product_class(x_type, w_type):
    """The product for arrays x and w: Float for two float arrays of one dtype, Widen for float32 x
    and uint16 w, Dot for uint16 both; None for any other pair (the intrinsic does not type)."""
    x_name, w_name = str(x_type.dtype), str(w_type.dtype)
    if x_name == w_name and x_name in ("float32", "float64"):
        return Float
    if x_name == "float32" and w_name == "uint16":
        return Widen
    if x_name == "uint16" and w_name == "uint16":
        return Dot
    return None
