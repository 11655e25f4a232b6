"""How the team's threads meet inside a kernel: a spin barrier on one shared counter.

One stream (B = 1: training, eval, sampling) splits each step's units across the team
(stream_kernels.py), and step t+1 needs every unit of h_t, so the threads meet once a step. A
team call hands all its threads one zeroed `sync` array (threads.Team.together); meeting for the
e-th time, a thread adds 1 to sync[ARRIVED] and waits until it reaches e * threads. Measured on 2
cores (Intel Xeon 2.8 GHz): 0.16-0.24 us a meeting, against ~5 us for a Numba parallel launch.

Waiting spins with the CPU's spin-wait hint and, after YIELD_AFTER spins (~10 us), gives the core
away (sched_yield, or SwitchToThread on Windows), so a thread whose partner lost its core to another
process does not burn the time slice the partner needs. target.py chooses both for the machine. A thread whose Python work failed sets sync[ABORT]: the others stop
waiting and return, and the team raises the error.

The team's calls use the same operations as doorbells (`ring`, `wait_for`): a helper waits for
its next job, and the caller for the helpers' ends, spinning instead of sleeping in the kernel,
because waking a thread that sleeps costs a VM's idle core 0.2-0.5 ms.

The operations are LLVM atomics emitted through numba.extending.intrinsic (Numba has none); they
call the yield by symbol (target.YIELD_SYMBOL), so a kernel loaded from the disk cache links it afresh.

MEMORY ORDER. Every handoff publishes with release and observes with acquire, so it holds on
weakly ordered CPUs (ARM) by construction, not by x86's strong ordering (which QEMU also gives ARM
code, so emulation cannot show a missing barrier):
  - meet: each thread's add to sync[ARRIVED] is acq_rel, so everything it wrote before meeting
    (its units of h_t, sampling's next state copy) is released; the adds form one release
    sequence, and a waiter's acquire load that sees the count reach meeting * threads therefore
    sees every thread's writes before the meeting.
  - ring / wait_for (the team's doorbells): the poster zeroes `sync` and the finisher writes its
    results before its acq_rel add; the waiter's acquire load that sees the count sees them.
  - sync[ABORT] publishes nothing but itself: a plain store, read with acquire.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from charlstm.engine.jit import inline_kernel, kernel
from charlstm.engine.target import ARCH, CAN_YIELD, SPIN_HINTS, YIELD_SYMBOL

ARRIVED, ABORT = 0, 8  # indices into sync: each on its own 64-byte line
SYNC_SIZE = 16
YIELD_AFTER = 256


def _element_pointer(context, builder, array_type, array, index):
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [index])


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value atomically, acquire and release (module docstring); returns the old value."""
    sig = types.int64(array, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        array, index, value = args
        return builder.atomic_rmw("add", _element_pointer(context, builder, sig.args[0], array, index), value,
                                  "acq_rel")
    return sig, codegen


@intrinsic
def atomic_read(typingctx, array, index):
    """array[index], read atomically with acquire order (writes before the writer's add are seen)."""
    sig = types.int64(array, types.int64)

    def codegen(context, builder, sig, args):
        array, index = args
        return builder.load_atomic(_element_pointer(context, builder, sig.args[0], array, index), "acquire", 8)
    return sig, codegen


@intrinsic
def _pause(typingctx):
    """The CPU's spin-wait hint (x86 `pause`, AArch64 `yield`; none elsewhere): the waiting loop
    yields pipeline resources to the other hardware thread and saves power."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        emit_spin_hint(builder, ARCH)
        return context.get_dummy_value()
    return sig, codegen


def emit_spin_hint(builder, arch):
    """Call `arch`'s spin-wait hint (target.SPIN_HINTS) at the builder's position, if it has one."""
    if arch in SPIN_HINTS:
        name, constants = SPIN_HINTS[arch]
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i32] * len(constants)), name)
        builder.call(fn, [ir.Constant(i32, c) for c in constants])


@intrinsic
def _sched_yield(typingctx):
    """Give the core to another runnable thread: the OS's call bound to target.YIELD_SYMBOL
    (sched_yield, SwitchToThread); nothing where the OS has neither (the loop then only spins)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        if CAN_YIELD:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), YIELD_SYMBOL)
            builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


@inline_kernel
def meet(sync, meeting, threads):
    """Wait until all `threads` threads have called meet for the meeting-th time (1, 2, ... within
    one team call). Returns False if a thread aborted: the caller should return at once."""
    if threads == 1:
        return True
    atomic_add(sync, ARRIVED, 1)
    target = meeting * threads
    spins = 0
    while atomic_read(sync, ARRIVED) < target:
        if atomic_read(sync, ABORT) != 0:
            return False
        spins += 1
        if spins < YIELD_AFTER:
            _pause()
        else:
            _sched_yield()
    return True


# ---------------------------------------------------------------- the team's doorbells (threads.Team)

@kernel
def ring(counter):
    """counter[0] += 1, atomically: a job posted, or a job finished."""
    atomic_add(counter, 0, 1)


@kernel
def wait_for(counter, target, spins):
    """Wait, without the GIL, until counter[0] >= target: spinning with `pause`, then yielding the
    core after YIELD_AFTER spins. Gives up after `spins` spins (0: never); returns whether it came."""
    n = 0
    while atomic_read(counter, 0) < target:
        n += 1
        if spins > 0 and n >= spins:
            return False
        if n < YIELD_AFTER:
            _pause()
        else:
            _sched_yield()
    return True
