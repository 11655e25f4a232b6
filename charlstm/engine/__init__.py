"""The engine: how one training step, one scored character or one sampled character computes.

The tool around it (cli, train, sample, evaluate, checkpoint, data, ...) calls the engine; nothing
here imports the tool. Top-down:

    network.py         one window through all layers: the output layer, the loss, every gradient
    recurrent.py       one layer's time loop, cut into the grid's cells, and the gate math (one
                       cell for every path)
    grid.py            how the time loop is cut: stream groups x unit groups, chosen by a cost model
    stream_kernels.py  sampling (one stream, every layer a char at a time), the output layer, the draw
    packed.py          Wh packed for the micro-kernels, and the micro-kernels themselves
    products.py        what one k of the micro-kernel does, per precision: float fma, bfloat16
                       widened to float32 (Widen), AVX512_BF16's pair dot (Dot)
    bf16.py            bfloat16 operands: rounding, the weights packed in pairs or singles, tiles
    batched.py         the window's batched products in bfloat16, on the micro-kernel (float32's
                       are BLAS's, kernels.py)
    kernels.py         the batched products and the softmax/loss around the time loop
    dropout.py         dropout masks from counter-based random numbers (the same on any thread count)
    layout.py          the flat parameter buffer and its named views
    threads.py         who owns threads (the one threading rule) and how many run (the Governor)
    barrier.py         how threads meet inside a kernel: a spin barrier on LLVM atomics
    target.py          the machine the kernels are compiled for: the micro-kernel's shape, the
                       bfloat16 product, the spin-wait hint and the yield call, per architecture
                       and OS
    blas.py            the BLAS Numba calls, kept to one thread
    jit.py             compile flags, the typed nonlinearities and the disk-cache policy, in one place
    files.py           the OS's file calls made alike on Linux, macOS and Windows: a lock the OS
                       drops with its holder (the kernel cache's; the tool's run folders use it
                       too), a replace that waits out Windows' readers, a folder's fsync
"""
