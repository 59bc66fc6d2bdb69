"""The Neuron backend: the same NumPy kernels, compiled by nkipy and run on Trainium NeuronCores.

:class:`NeuronBackend` implements ``Backend.call`` (see :mod:`runtime.backends`) with nkipy
(``DeviceKernel``, ``DeviceTensor``); :func:`select_backend` picks a backend by name. nkipy, its
compiler and torch are imported lazily, inside functions, so this module imports anywhere.

Environment:

- ``MIMO_BACKEND`` (``auto`` | ``cpu`` | ``neuron``): used when the requested backend is ``auto``;
- ``MIMO_NEURON_BUILD_DIR``: the persistent compile cache (default ``~/.cache/mimo-shard/neuron``);
- ``NEURON_RT_VISIBLE_CORES``: when unset and the run has several ranks, the logical core
  :func:`mimo.hbm.core_for_rank` gives the local rank (ranks spread over the chips first);
  ``NEURON_LOGICAL_NC_CONFIG`` defaults to ``--lnc``.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mimo.hbm import core_for_rank
from runtime.backends import Backend, CpuBackend
from runtime.kernels.attention_full import attention_full
from runtime.kernels.attention_swa import attention_swa
from runtime.kernels.decoder import LAYER, final_logits, next_token
from runtime.kernels.dense_mlp import dense_mlp
from runtime.kernels.logits import logits
from runtime.kernels.moe_block import moe_block
from runtime.kernels.rmsnorm import rmsnorm
from runtime.kernels.token_embedding import token_embedding

INSTALL_HINT = "see the README section 'Running on Trainium: the Neuron backend'"
BACKENDS = ("auto", "cpu", "neuron")
# keyword arguments of DeviceKernel.compile_and_load: no kernel parameter may use these names
RESERVED = {
    "name",
    "additional_compiler_args",
    "use_cached_if_exists",
    "build_dir",
    "target",
    "is_spmd",
    "cc_enabled",
    "rank_id",
    "world_size",
}
# nkipy's tracer downcasts these input dtypes; uploads must match the compiled kernel
DOWNCAST = {np.dtype(np.float64): np.dtype(np.float32), np.dtype(np.int64): np.dtype(np.int32)}

Spec = tuple[tuple[int, ...], np.dtype]  # shape, dtype
OutputRule = Callable[[dict[str, Spec], dict[str, Any]], Spec]


def _like(name: str) -> OutputRule:
    return lambda a, s: a[name]


def _group_size(comm: Any) -> int:
    return len(comm.replica_groups[0])


# Shape and dtype of ``output0`` per kernel, from its inputs' shapes/dtypes and static values (its
# docstring's contract). Spike checks ``output0`` against the compiled kernel on every call, so a
# wrong rule fails loudly at the first call; the contract test checks every rule. Results must have
# at least one dimension: DeviceTensor.from_numpy stores a 0-d array as shape (1,).
OUTPUT_RULES: dict[Callable[..., Any], OutputRule] = {
    token_embedding: lambda a, s: (
        (a["ids"][0][0], a["table"][0][1]),
        np.dtype(s.get("dtype", np.float32)),
    ),
    rmsnorm: _like("x"),
    attention_full: _like("x"),
    attention_swa: _like("x"),
    dense_mlp: _like("x"),
    moe_block: _like("x"),
    logits: lambda a, s: (
        (a["h"][0][0], a["lm_head_w"][0][1] * _group_size(s["comm"])),
        np.dtype(np.float32),
    ),
    # the fused device path (runtime.resident): the residual stream and logits are float32
    **{kernel: lambda a, s: (a["x"][0], np.dtype(np.float32)) for kernel in LAYER.values()},
    final_logits: lambda a, s: (
        (a["x"][0][0], a["lm_head_w"][0][1] * _group_size(s["comm"])),
        np.dtype(np.float32),
    ),
    next_token: lambda a, s: ((1,), np.dtype(np.int32)),
}


# ---------------------------------------------------------------------------------- selection
def _neuron_problem() -> str | None:
    """Why the Neuron backend cannot run here, or None when it can (docs/nkipy.md §8)."""
    try:
        import nkipy.core.compile  # noqa: F401 - imports neuronx-cc
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top == "neuronxcc":
            return "the Neuron compiler (neuronx-cc, from the Neuron SDK) is not installed"
        if top == "nkipy":
            return "nkipy is not installed"
        return f"nkipy is not importable ({e})"
    except Exception as e:  # noqa: BLE001 - e.g. PyPI's placeholder 'nkipy' raises ImportError
        return (
            f"nkipy is not importable ({type(e).__name__}: {e}); the 'nkipy' package on PyPI "
            "is a placeholder, install nkipy from github.com/aws-neuron/nkipy"
        )
    try:
        from nkipy.runtime import DeviceKernel, DeviceTensor  # noqa: F401
        from spike._spike import Spike

        cores = Spike.get_visible_neuron_core_count()
    except Exception as e:  # noqa: BLE001 - ImportError, OSError from libnrt, ...
        return f"the Neuron runtime (nkipy.runtime, spike, libnrt) is not usable ({e})"
    if cores <= 0:
        return "no NeuronCores are visible (check the Neuron driver and NEURON_RT_VISIBLE_CORES)"
    return None


def neuron_available() -> bool:
    """True when nkipy, the Neuron compiler and runtime import and a NeuronCore is visible.

    Never raises: any failure means False.
    """
    try:
        return _neuron_problem() is None
    except Exception:  # noqa: BLE001
        return False


def _torch_world() -> int | None:
    """World size of an initialised ``torch.distributed`` (never imports torch), else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_world_size()


def select_backend(
    name: str, rank: int, world_size: int, build_dir: Path | None = None, lnc: int = 2
) -> Backend:
    """The backend called ``name`` (``auto``, ``cpu`` or ``neuron``) for rank ``rank``.

    ``auto`` defers to ``MIMO_BACKEND`` when set, then picks ``neuron`` when
    :func:`neuron_available` and the run can use it, else ``cpu``. A run of several ranks uses the
    Neuron backend only with one process per rank joined by ``torch.distributed`` (``torchrun``);
    ranks sharing a process (threads) run on the CPU. ``neuron`` raises RuntimeError naming what
    is missing; an unknown name raises ValueError.
    """
    origin = ""
    if name == "auto":
        name = os.environ.get("MIMO_BACKEND", "auto").strip().lower() or "auto"
        origin = f" (from MIMO_BACKEND={name})" if name != "auto" else ""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}{origin}: choose one of {', '.join(BACKENDS)}")
    if name == "cpu":
        return CpuBackend()
    one_process_per_rank = world_size == 1 or _torch_world() == world_size
    if one_process_per_rank:
        _pin_core(rank, world_size, lnc)
    if name == "auto":
        if one_process_per_rank and neuron_available():
            return NeuronBackend(rank, world_size, build_dir, lnc)
        return CpuBackend()
    problem = _neuron_problem()
    if problem is None and not one_process_per_rank:
        problem = (
            f"the Neuron backend runs one process per rank: launch the {world_size} ranks "
            f"with torchrun --nproc-per-node {world_size}"
        )
    if problem is not None:
        raise RuntimeError(
            f"backend 'neuron'{origin} is unavailable: {problem}; "
            f"{INSTALL_HINT}, or use the cpu backend"
        )
    return NeuronBackend(rank, world_size, build_dir, lnc)


def _pin_core(rank: int, world_size: int, lnc: int = 2) -> None:
    """One logical NeuronCore per rank process, ranks spread over the chips
    (:func:`mimo.hbm.core_for_rank`): ``NEURON_RT_VISIBLE_CORES`` and
    ``NEURON_LOGICAL_NC_CONFIG`` default to that placement (a value already set is kept)."""
    os.environ.setdefault("NEURON_LOGICAL_NC_CONFIG", str(lnc))
    if world_size > 1:
        local = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        core = core_for_rank(local, local_world, lnc)["core"]
        os.environ.setdefault("NEURON_RT_VISIBLE_CORES", str(core))


def default_build_dir() -> Path:
    """``MIMO_NEURON_BUILD_DIR``, else ``~/.cache/mimo-shard/neuron``."""
    env = os.environ.get("MIMO_NEURON_BUILD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mimo-shard" / "neuron"


# ------------------------------------------------------------------------------------ backend
@dataclass
class _Compiled:
    kernel: Any  # a loaded DeviceKernel
    spec: Spec  # output0's shape and dtype
    output: Any = None  # the output0 DeviceTensor reused call after call, made on first use


class NeuronBackend:
    """Run kernels on this process's NeuronCore with nkipy.

    Per call:

    - the kernel is compiled once per distinct (kernel, input names/shapes/dtypes, static values,
      state names) with ``DeviceKernel.compile_and_load(kernel, name=..., build_dir=...,
      **placeholders, **static)``; placeholders are ``np.empty`` arrays of the inputs' shapes and
      dtypes, never the weights. nkipy names the cache entry after the kernel and a hash of its
      HLO, so a persistent ``build_dir`` reuses the compiled kernel across processes;
    - read-only inputs are weights (the loader's memory maps): uploaded once each, straight from
      the mapped array with no host copy (cached by object identity, dropped with the array);
    - names in ``state`` are arrays the kernel must update in place: each object is uploaded once,
      then bound as input ``<name>.must_alias_input`` and output ``<name>`` to the same
      DeviceTensor; the device copy is the state from then on (the host array is not updated);
    - other inputs are uploaded every call into a device buffer reused per (name, shape, dtype);
    - the result is written to the kernel's ``output0`` DeviceTensor, whose shape and dtype come
      from :data:`OUTPUT_RULES`, and returned as a NumPy array.

    With ``world_size > 1`` kernels are loaded with collectives enabled (``cc_enabled=True``,
    ``rank_id``, ``world_size``) in nkipy's SPMD mode: under ``torch.distributed`` rank 0 compiles
    and the other ranks load its NEFF, so every rank must make the same calls in the same order.
    Without ``torch.distributed`` every process compiles, serialised by a lock in ``build_dir``.
    """

    name = "neuron"

    def __init__(
        self, rank: int = 0, world_size: int = 1, build_dir: Path | None = None, lnc: int = 2
    ) -> None:
        _pin_core(rank, world_size, lnc)  # before the runtime initialises
        self.lnc = lnc
        from nkipy.runtime import DeviceKernel, DeviceTensor

        self._kernel_cls, self._tensor_cls = DeviceKernel, DeviceTensor
        self.rank, self.world_size = rank, world_size
        self.build_dir = Path(build_dir) if build_dir is not None else default_build_dir()
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self._compiled: dict[tuple, _Compiled] = {}
        self._bound: dict[int, tuple[weakref.ref, Any]] = {}  # id(weight or state) -> tensor
        self._buffers: dict[tuple, Any] = {}  # (name, shape, dtype) -> per-call input tensor

    def call(
        self,
        kernel: Callable[..., Any],
        arrays: dict[str, np.ndarray],
        static: dict[str, Any],
        state: tuple[str, ...] = (),
    ) -> np.ndarray:
        """Run ``kernel`` on the device; the same contract as ``CpuBackend.call``."""
        return self.run(kernel, arrays, static, state).numpy()

    def run(
        self,
        kernel: Callable[..., Any],
        arrays: dict[str, Any],
        static: dict[str, Any],
        state: tuple[str, ...] = (),
        out: Any = None,
    ) -> Any:
        """Run ``kernel`` and return its ``output0`` DeviceTensor, not read back.

        ``arrays`` may hold DeviceTensors (another kernel's output, a step input from
        :meth:`upload`, a cache from :meth:`tensor`): they are bound as they are, with no copy.
        ``out`` is the DeviceTensor to write ``output0`` to (shape and dtype of
        :data:`OUTPUT_RULES`); by default the compiled kernel's own, reused call after call.
        """
        arrays = {
            k: a.astype(DOWNCAST[a.dtype])
            if isinstance(a, np.ndarray) and a.dtype in DOWNCAST
            else a
            for k, a in arrays.items()
        }
        key = _compile_key(kernel, arrays, static, state)
        compiled = self._compiled.get(key) or self._compile(key, kernel, arrays, static)
        if out is None:
            if compiled.output is None:
                compiled.output = self._tensor_cls.from_numpy(
                    np.empty(*compiled.spec), name="output0"
                )
            out = compiled.output
        inputs, outputs = {}, {"output0": out}
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray):  # already on the device
                tensor = a
            elif name in state or not a.flags.writeable:  # state, or a weight
                tensor = self._persistent(name, a)
            else:
                tensor = self._upload(name, a)
            if name in state:
                inputs[f"{name}.must_alias_input"] = outputs[name] = tensor
            else:
                inputs[name] = tensor
        compiled.kernel(inputs=inputs, outputs=outputs)
        return out

    def tensor(self, a: np.ndarray, name: str) -> Any:
        """A new DeviceTensor holding a copy of ``a`` (a cache, an output buffer)."""
        return self._tensor_cls.from_numpy(np.ascontiguousarray(a), name=name)

    def weight(self, name: str, a: np.ndarray) -> Any:
        """The DeviceTensor of ``a``, uploaded on first use of the object (weights)."""
        return self._persistent(name, a)

    def upload(self, name: str, a: np.ndarray) -> Any:
        """A per-step input written into the reused device buffer of (name, shape, dtype)."""
        return self._upload(name, a)

    def read(self, tensor: Any) -> np.ndarray:
        """A DeviceTensor's contents on the host."""
        return tensor.numpy()

    @property
    def compiled(self) -> int:
        """How many distinct kernels this backend has compiled."""
        return len(self._compiled)

    def _compile(
        self,
        key: tuple,
        kernel: Callable[..., Any],
        arrays: dict[str, np.ndarray],
        static: dict[str, Any],
    ) -> _Compiled:
        clash = RESERVED & (arrays.keys() | static.keys())
        if clash:
            raise ValueError(
                f"{kernel.__name__}: parameter names {sorted(clash)} are reserved "
                "by DeviceKernel.compile_and_load"
            )
        rule = OUTPUT_RULES.get(kernel)
        if rule is None:
            raise NotImplementedError(
                f"NeuronBackend has no output rule for kernel "
                f"{kernel.__name__}: add one to runtime.neuron.OUTPUT_RULES"
            )
        shape, dtype = rule({k: (a.shape, a.dtype) for k, a in arrays.items()}, static)
        placeholders = {k: np.empty(a.shape, np.dtype(a.dtype)) for k, a in arrays.items()}
        collectives = (
            {"cc_enabled": True, "rank_id": self.rank, "world_size": self.world_size}
            if self.world_size > 1
            else {}
        )
        with self._compile_lock():
            loaded = self._kernel_cls.compile_and_load(
                kernel,
                name=kernel.__name__,
                additional_compiler_args=f"--lnc {self.lnc}",  # must match the runtime's LNC
                build_dir=str(self.build_dir),
                **collectives,
                **placeholders,
                **static,
            )
        compiled = self._compiled[key] = _Compiled(loaded, (shape, dtype))
        return compiled

    @contextmanager
    def _compile_lock(self) -> Iterator[None]:
        """Serialise compiles into ``build_dir`` between processes that each compile.

        Under ``torch.distributed`` nkipy compiles on rank 0 only while the others wait for it in
        a collective, so no lock is taken there (it could deadlock).
        """
        if _torch_world() is not None:
            yield
            return
        import fcntl

        with open(self.build_dir / ".compile.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _persistent(self, name: str, a: np.ndarray) -> Any:
        """The DeviceTensor of a weight or state array, uploaded on first use of the object."""
        entry = self._bound.get(id(a))
        if entry is not None and entry[0]() is a:
            return entry[1]
        tensor = self._tensor_cls.from_numpy(a, name=f"{name}_{len(self._bound)}")
        self._bound[id(a)] = (weakref.ref(a), tensor)
        weakref.finalize(a, self._bound.pop, id(a), None)  # free the device copy with the array
        return tensor

    def _upload(self, name: str, a: np.ndarray) -> Any:
        """A per-call input: written into this (name, shape, dtype)'s reused device buffer."""
        key = (name, a.shape, a.dtype)
        tensor = self._buffers.get(key)
        if tensor is None:
            tensor = self._buffers[key] = self._tensor_cls.from_numpy(a, name=name)
        else:
            tensor.write_from_numpy(a)
        return tensor


def _compile_key(
    kernel: Callable[..., Any],
    arrays: dict[str, np.ndarray],
    static: dict[str, Any],
    state: tuple[str, ...],
) -> tuple:
    """What makes a compiled kernel distinct: the function, its inputs' names, shapes and dtypes,
    its static values (a communicator by its replica groups) and the in-place names."""
    shapes = tuple(sorted((k, a.shape, a.dtype) for k, a in arrays.items()))
    values = tuple(
        sorted(
            (k, tuple(map(tuple, v.replica_groups)) if hasattr(v, "replica_groups") else repr(v))
            for k, v in static.items()
        )
    )
    return kernel, shapes, values, tuple(sorted(state))
