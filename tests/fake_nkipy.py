"""Stand-ins for nkipy and spike that follow docs/nkipy.md, running kernels with NumPy.

:func:`install` puts modules ``nkipy``, ``nkipy.core``, ``nkipy.core.compile``, ``nkipy.runtime``,
``spike`` and ``spike._spike`` into ``sys.modules`` (through ``monkeypatch``) and returns a
:class:`Log` of what the code under test did with them:

- ``DeviceKernel.compile_and_load(kernel, *args, name=None, ..., build_dir=None, is_spmd=True,
  cc_enabled=None, rank_id=None, world_size=None, **kwargs)`` (docs/nkipy.md §4) binds the
  sample arguments to the kernel's signature (ndarrays are inputs, the rest static), "traces"
  the kernel on zeros of the sample shapes to find the parameters it assigns through
  ``__setitem__`` (they become
  ``<name>.must_alias_input`` inputs plus ``<name>`` outputs, docs/nkipy.md §4) and its result
  (``output0``), and returns a kernel. A communicator is only asked for ``replica_groups``
  while tracing; collectives are replaced by shape-only stand-ins (nkipy's own CPU semantics,
  docs/nkipy.md §5).
- Calling the kernel with ``inputs=``/``outputs=`` dicts of DeviceTensors checks names, shapes
  and dtypes as Spike does, and that each aliased pair is one tensor; it then runs the NumPy
  kernel on the tensors' device memory (aliased tensors are updated in place) and writes the
  result into ``output0``.
- ``DeviceTensor.from_numpy(arr, name=None, core_id=0)`` copies ``arr`` into "device" memory
  (recording the object it was given), ``.numpy()`` reads a copy back, ``.write_from_numpy(arr)``
  overwrites the bytes in place and refuses another size. Every host<->device copy and kernel
  run is also appended to ``Log.events`` in order, so tests can count copies per step.
- ``spike._spike.Spike.get_visible_neuron_core_count()`` returns ``cores``.
"""

from __future__ import annotations

import inspect
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Log:
    compiles: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[tuple[str, np.ndarray, Any]] = field(default_factory=list)  # name, source, tensor
    writes: int = 0
    reads: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)  # (upload|write|read|run, name)
    runs: list[dict[str, Any]] = field(default_factory=list)
    compiler_args: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Param(np.ndarray):
    """A traced parameter: records assignments made through it (not through views of it)."""

    def __setitem__(self, idx, value):
        if "param" in self.__dict__:
            self.mutated.add(self.param)
        super().__setitem__(idx, value)


class _TraceComm:
    """Collectives while tracing: shapes only (nkipy's CPU ops assume duplicated data)."""

    def __init__(self, replica_groups: list[list[int]]) -> None:
        self.replica_groups = [list(g) for g in replica_groups]

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def all_gather(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.concatenate([x] * len(self.replica_groups[0]), axis=axis)


def _trace(kernel, arrays: dict[str, np.ndarray], static: dict[str, Any]):
    mutated: set[str] = set()
    params = {}
    for k, a in arrays.items():
        p = np.zeros(a.shape, a.dtype).view(_Param)
        p.param, p.mutated = k, mutated
        params[k] = p
    static = {
        k: _TraceComm(v.replica_groups) if hasattr(v, "replica_groups") else v
        for k, v in static.items()
    }
    with np.errstate(all="ignore"):
        out = np.asarray(kernel(**params, **static))
    return mutated, (out.shape, out.dtype)


def make_modules(log: Log, cores: int) -> dict[str, types.ModuleType]:
    class DeviceTensor:
        def __init__(self, data: np.ndarray, name: str | None) -> None:
            self.data, self.name = data, name  # ``data`` is the device memory
            self.shape, self.dtype = data.shape, data.dtype

        @classmethod
        def from_numpy(cls, array: np.ndarray, name: str | None = None, core_id: int = 0):
            tensor = cls(np.array(np.ascontiguousarray(array), copy=True), name)
            with log.lock:
                log.uploads.append((name, array, tensor))
                log.events.append(("upload", name))
            return tensor

        def numpy(self) -> np.ndarray:
            with log.lock:
                log.reads += 1
                log.events.append(("read", self.name))
            return self.data.copy()

        def write_from_numpy(self, array: np.ndarray) -> None:
            array = np.ascontiguousarray(array)
            if array.nbytes != self.data.nbytes:
                raise ValueError(
                    f"Size mismatch: source {array.nbytes} bytes, target {self.data.nbytes} bytes"
                )
            self.data.reshape(-1).view(np.uint8)[:] = array.reshape(-1).view(np.uint8)
            with log.lock:
                log.writes += 1
                log.events.append(("write", self.name))

    class DeviceKernel:
        def __init__(self, fn, name, params, mutated, static, out_spec) -> None:
            self.fn, self.name, self.static = fn, name, static
            self.inputs = {
                (f"{k}.must_alias_input" if k in mutated else k): spec for k, spec in params.items()
            }
            self.outputs = {"output0": out_spec, **{k: params[k] for k in mutated}}
            self.mutated = mutated

        @classmethod
        def compile_and_load(
            cls,
            kernel,
            *args,
            name=None,
            additional_compiler_args=None,
            use_cached_if_exists=True,
            build_dir=None,
            target=None,
            is_spmd=True,
            cc_enabled=None,
            rank_id=None,
            world_size=None,
            **kwargs,
        ):
            bound = inspect.signature(kernel).bind(*args, **kwargs)  # unknown names raise
            samples = {
                k: v.numpy() if isinstance(v, DeviceTensor) else v
                for k, v in bound.arguments.items()
            }
            arrays = {k: v for k, v in samples.items() if isinstance(v, np.ndarray)}
            static = {k: v for k, v in samples.items() if k not in arrays}
            if cc_enabled and (rank_id is None or world_size is None):
                raise ValueError("rank_id and world_size are required when cc_enabled=True")
            mutated, out_spec = _trace(kernel, arrays, static)
            name = name or kernel.__name__
            log.compiler_args.append(additional_compiler_args)
            with log.lock:
                log.compiles.append(
                    {
                        "kernel": kernel,
                        "name": name,
                        "build_dir": build_dir,
                        "arrays": arrays,
                        "static": static,
                        "is_spmd": is_spmd,
                        "cc_enabled": cc_enabled,
                        "rank_id": rank_id,
                        "world_size": world_size,
                        "mutated": mutated,
                    }
                )
            params = {k: (a.shape, a.dtype) for k, a in arrays.items()}
            return cls(kernel, name, params, mutated, static, out_spec)

        def __call__(self, inputs: dict[str, Any], outputs: dict[str, Any] | None = None):
            outputs = outputs or {}
            for kind, given, expected in (
                ("input", inputs, self.inputs),
                ("output", outputs, self.outputs),
            ):
                if set(given) != set(expected):
                    raise ValueError(
                        f"{self.name}: {kind}s {sorted(given)}, expected {sorted(expected)}"
                    )
                for k, t in given.items():
                    if not isinstance(t, DeviceTensor):
                        raise TypeError(f"{self.name}: {kind} {k} is not a DeviceTensor")
                    if (t.shape, t.dtype) != tuple(expected[k]):
                        raise AssertionError(
                            f"{self.name}: {kind} {k}: expected {expected[k]}, "
                            f"got {(t.shape, t.dtype)}"
                        )
            for k in self.mutated:
                if inputs[f"{k}.must_alias_input"] is not outputs[k]:
                    raise AssertionError(f"{self.name}: {k} is not aliased to its input")
            args = {k.removesuffix(".must_alias_input"): t.data for k, t in inputs.items()}
            result = np.asarray(self.fn(**args, **self.static))
            if (result.shape, result.dtype) != self.outputs["output0"]:
                raise AssertionError(
                    f"{self.name}: computed {(result.shape, result.dtype)}, "
                    f"output0 is {self.outputs['output0']}"
                )
            np.copyto(outputs["output0"].data, result)
            with log.lock:
                log.runs.append(
                    {"name": self.name, "inputs": dict(inputs), "outputs": dict(outputs)}
                )
                log.events.append(("run", self.name))

    class Spike:
        @staticmethod
        def get_visible_neuron_core_count() -> int:
            return cores

    nkipy = types.ModuleType("nkipy")
    core = types.ModuleType("nkipy.core")
    compile_ = types.ModuleType("nkipy.core.compile")
    runtime = types.ModuleType("nkipy.runtime")
    spike = types.ModuleType("spike")
    spike_ = types.ModuleType("spike._spike")
    nkipy.__path__, core.__path__, spike.__path__ = [], [], []  # packages
    nkipy.core, core.compile, nkipy.runtime, spike._spike = core, compile_, runtime, spike_
    runtime.DeviceKernel, runtime.DeviceTensor, spike_.Spike = DeviceKernel, DeviceTensor, Spike
    return {
        "nkipy": nkipy,
        "nkipy.core": core,
        "nkipy.core.compile": compile_,
        "nkipy.runtime": runtime,
        "spike": spike,
        "spike._spike": spike_,
    }


def install(monkeypatch, cores: int = 1) -> Log:
    """Put the stand-in modules into ``sys.modules`` for this test; return their log."""
    log = Log()
    for name, module in make_modules(log, cores).items():
        monkeypatch.setitem(sys.modules, name, module)
    return log
