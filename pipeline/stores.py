"""Streaming (non-temporal) stores for the compiled loops, as numba intrinsics.

The converter's kernels write outputs far larger than any cache, once, and hand them to a direct
write. A plain store first reads the destination's cache line from memory (read for ownership)
and leaves it in cache, where it only evicts the source. A store marked non-temporal (LLVM's
``!nontemporal`` hint: ``movnti`` on x86-64) goes through the core's write-combining buffers
straight to memory: a third less memory traffic for a 1-byte-in, 2-byte-out kernel, and the
source stays in cache. The hint never changes what is stored; a target without such stores
emits plain ones.

Streaming stores are weakly ordered, so a loop that uses them ends with :func:`drain` (a full
fence): after it every store is visible to other threads and to the kernel's DMA of a write.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def store_streaming(typingctx, array, index, value):
    """``array[index] = value`` as a non-temporal store (1-D C-contiguous ``array``; ``index``
    unchecked, like the loops' other unsigned indices)."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and value == array.dtype):
        return None

    def codegen(context, builder, signature, args):
        data, i, v = args
        ptr = builder.gep(context.make_array(signature.args[0])(context, builder, data).data, [i])
        store = builder.store(v, ptr)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def drain(typingctx):
    """A full memory fence: every earlier store, streaming ones included, is visible after it."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen
