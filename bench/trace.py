"""Trace every device kernel with the real nkipy tracer at MiMo-V2-Flash's per-device shapes.

Each kernel of ``runtime/kernels`` is traced (``NKIPyKernel.trace(fn).specialize(...)``) and
lowered to an XLA HLO module proto (``to_proto``), exactly as ``DeviceKernel.compile_and_load``
does before it calls the compiler; nothing is compiled and no device is needed. The arguments are
those the model passes through ``Backend.call`` (``runtime/model.py``): activations, caches and
rope tables float32, positions/slots/token ids int32, expert ids uint32, weights in the store's
dtype and per-device shape (``pipeline.plan`` for rank 0), read-only placeholders that take no
memory. Prefill is traced at ``--prompt`` lengths, decode at one token, for each ``--devices``.

Per traced module it checks what the Neuron backend relies on:

- ``output0`` has the shape and dtype of ``runtime.neuron.OUTPUT_RULES`` (kernels it runs);
- the in-place inputs (``<name>.must_alias_input``) are exactly the state the model passes;

and prints the entry computation's HLO instruction count by opcode. Exit status 1 when any
kernel fails to trace or lower, or breaks a check; 2 on a bad option or config file.

nkipy on PyPI is a placeholder: trace with nkipy installed from a source checkout, in its own
virtualenv (``.venv-trace``, made once by the Makefile; neuronx-cc is not needed to trace)::

    make trace NKIPY_SRC=/path/to/nkipy        # github.com/aws-neuron/nkipy
    .venv-trace/bin/python bench/trace.py [--config manifests/mimo-v2-flash/config.json]
        [--devices 32 64] [--prompt 128 512] [--max-seq-len 4096] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import runtime.kernels  # noqa: E402
from loader.format import SHARED, device_store  # noqa: E402
from mimo.config import FULL, MOE, MiMoConfig  # noqa: E402
from pipeline.plan import Options, build_plan  # noqa: E402
from runtime.kernels.attention_full import attention_full  # noqa: E402
from runtime.kernels.attention_swa import attention_swa  # noqa: E402
from runtime.kernels.decoder import LAYER, LAYER_STATE, final_logits, next_token  # noqa: E402
from runtime.kernels.dense_mlp import dense_mlp  # noqa: E402
from runtime.kernels.logits import logits  # noqa: E402
from runtime.kernels.moe_block import moe_block  # noqa: E402
from runtime.kernels.moe_router import moe_router  # noqa: E402
from runtime.kernels.rmsnorm import rmsnorm  # noqa: E402
from runtime.kernels.rope_partial import rope_partial  # noqa: E402
from runtime.kernels.sampling import greedy, sample  # noqa: E402
from runtime.kernels.softmax import softmax  # noqa: E402
from runtime.kernels.swiglu import swiglu  # noqa: E402
from runtime.kernels.token_embedding import token_embedding  # noqa: E402
from runtime.neuron import OUTPUT_RULES  # noqa: E402
from runtime.resident import BF16, buckets, chunks  # noqa: E402

try:  # the expert weights' on-device FP8 dequantisation, not yet called by the model
    from runtime.kernels.fp8_dequant import dequant_blocks  # noqa: E402
except ImportError:
    dequant_blocks = None

CONFIG = ROOT / "manifests" / "mimo-v2-flash" / "config.json"
F32, I32, U32 = np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.uint32)
FP8 = np.dtype(ml_dtypes.float8_e4m3)  # Trainium2's native FP8 (the checkpoint's is e4m3fn)
FP8_BLOCK = 128  # MiMo-V2-Flash's 128x128 weight-scale blocks
# public functions of runtime/kernels that are not traced on their own, and why
NOT_TRACED = {
    "project_qkv": "part of attention_full / attention_swa",
    "project_out": "part of attention_full / attention_swa",
    "attend": "part of attention_full / attention_swa",
    "rope_tables": "host side: builds the cos/sin inputs",
    "expert_weights": "part of the fused MoE layers",
    "moe_mlp": "part of the fused MoE layers",
    "dequant_parts": "part of moe_block with FP8 experts (traced as such)",
    "replica_owner": "part of moe_block with replicated experts (traced as such)",
    "layer_swa_dense": "no MiMo-V2-Flash layer is sliding with a dense MLP (NumPy-tested)",
}
FUSED_MODULE = "runtime.kernels.decoder"  # traced by fused_cases, not kernel_cases
# what generate.py samples with by default
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}

Spec = tuple[tuple[int, ...], np.dtype]


@dataclass(frozen=True)
class TraceComm:
    """A communicator as a traced kernel sees it: only ``replica_groups`` is read."""

    world_size: int

    @property
    def replica_groups(self) -> list[list[int]]:
        return [list(range(self.world_size))]


@dataclass
class Case:
    """One kernel call to trace: its array inputs (shape, dtype), static values, state names."""

    label: str  # kernel name plus the layer kind it serves
    kernel: Callable[..., Any]
    arrays: dict[str, Spec]
    static: dict[str, Any] = field(default_factory=dict)
    state: tuple[str, ...] = ()


@dataclass
class Result:
    case: Case
    ops: Counter  # opcode -> instruction count in the entry computation
    error: str | None = None


# ----------------------------------------------------------------------------------- shapes
def load_config(path: Path) -> MiMoConfig:
    return MiMoConfig.from_file(path)


def device_arrays(config: Path, devices: int) -> tuple[dict[str, Spec], dict[str, Any]]:
    """Rank 0's arrays (shared and its own store) as path -> (shape, dtype), and the layout."""
    plan = build_plan(MiMoConfig.from_file(config), Options(devices=devices))
    mine = (SHARED, device_store(0))
    arrays = {
        a.path: (tuple(a.shape), _dtype(a.dtype)) for _, a in plan.arrays() if a.store in mine
    }
    return arrays, plan.layout


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def layer_kinds(cfg: MiMoConfig) -> list[int]:
    """The first layer of each distinct layer shape (attention kind, sinks, MLP kind)."""
    seen: dict[tuple, int] = {}
    for spec in cfg.layers:
        seen.setdefault((spec.attention, spec.sinks, spec.mlp, spec.head_dim), spec.index)
    return list(seen.values())


def kernel_cases(config: Path, devices: int, tokens: int, max_seq_len: int) -> list[Case]:
    """Every device-kernel call of one forward step of ``tokens`` tokens on rank 0 of
    ``devices``, for the model of the ``config`` file."""
    cfg = load_config(config)
    arrays, layout = device_arrays(config, devices)
    comm = TraceComm(devices)
    h, t = cfg.hidden_size, tokens
    eps = cfg.rms_norm_eps
    x = ((t, h), F32)
    cases = [
        Case("token_embedding", token_embedding, {"ids": ((t,), I32), "table": arrays["embed"]}),
        Case("rmsnorm", rmsnorm, {"x": x, "weight": arrays["norm"]}, {"eps": eps}),
    ]
    for index in layer_kinds(cfg):
        cases += _layer_cases(cfg, index, arrays, layout, comm, t, max_seq_len)
    cases.append(
        Case(
            "logits",
            logits,
            {"h": x, "norm_w": arrays["norm"], "lm_head_w": arrays["lm_head"]},
            {"eps": eps, "comm": comm},
        )
    )
    vocab = ((cfg.vocab_size,), F32)
    top_k = min(SAMPLING["top_k"], cfg.vocab_size)
    cases += [
        Case("greedy", greedy, {"logits": vocab}),
        Case("sample", sample, {"logits": vocab, "u": ((), F32)}, {**SAMPLING, "top_k": top_k}),
        Case("softmax", softmax, {"x": ((top_k,), F32)}),
    ]
    return cases


def _attention_inputs(
    cfg: MiMoConfig,
    index: int,
    arrays: dict[str, Spec],
    layout: dict[str, Any],
    comm: TraceComm,
    t: int,
) -> tuple[dict[str, Spec], dict[str, Any]]:
    """Rank 0's attention inputs and static values on layer ``index`` for ``t`` tokens."""
    spec, lp = cfg.layer(index), f"layers/{index}"
    rank0 = layout["attention"][str(index)][0]
    (h0, h1), (g0, g1) = rank0["q_heads"], rank0["kv_heads"]
    rope = ((t, spec.rotary_dim), F32)
    inputs = {
        "x": ((t, cfg.hidden_size), F32),
        "qkv_w": arrays[f"{lp}/attn/qkv"],
        "o_w": arrays[f"{lp}/attn/o"],
        "positions": ((t,), I32),
        "cos": rope,
        "sin": rope,
    }
    if spec.sinks:
        inputs["sinks"] = arrays[f"{lp}/attn/sinks"]
    static = {
        "heads": h1 - h0,
        "kv_heads": g1 - g0,
        "head_dim": spec.head_dim,
        "v_head_dim": spec.v_head_dim,
        "value_scale": cfg.attention_value_scale,
        "comm": comm,
    }
    return inputs, static


def _layer_cases(
    cfg: MiMoConfig,
    index: int,
    arrays: dict[str, Spec],
    layout: dict[str, Any],
    comm: TraceComm,
    t: int,
    max_seq_len: int,
) -> list[Case]:
    spec, lp = cfg.layer(index), f"layers/{index}"
    kind = f"{spec.attention}{'+sinks' if spec.sinks else ''} L{index}"
    x = ((t, cfg.hidden_size), F32)
    attn, static = _attention_inputs(cfg, index, arrays, layout, comm, t)
    kv, d, dv = static["kv_heads"], spec.head_dim, spec.v_head_dim
    if spec.attention == FULL:
        cache = {"cache_k": ((max_seq_len, kv, d), F32), "cache_v": ((max_seq_len, kv, dv), F32)}
        full = Case(f"attention_full {kind}", attention_full, {**attn, **cache}, static)
        full.state = tuple(cache)
        cases = [full]
    else:
        ring = spec.window - 1
        cache = {
            "ring_k": ((ring, kv, d), F32),
            "ring_v": ((ring, kv, dv), F32),
            "ring_pos": ((ring,), I32),
        }
        cases = [
            Case(
                f"attention_swa {kind}",
                attention_swa,
                {**attn, **cache, "slots": ((min(t, ring),), I32)},
                {**static, "window": spec.window},
                tuple(cache),
            )
        ]
    q = ((t, static["heads"], d), F32)
    rope = {"cos": attn["cos"], "sin": attn["sin"]}
    cases.append(Case(f"rope_partial {kind}", rope_partial, {"x": q, **rope}))
    if spec.mlp == MOE:
        gate_up, down = arrays[f"{lp}/experts/gate_up"], arrays[f"{lp}/experts/down"]
        local = gate_up[0][0]
        router = {
            "x": x,
            "router_w": arrays[f"{lp}/router"],
            "choice_bias": arrays[f"{lp}/router_bias"],
        }
        routing = {
            "top_k": cfg.num_experts_per_tok,
            "norm_topk": cfg.norm_topk_prob,
            "scaling": cfg.routed_scaling_factor,
        }
        moe = {**router, "expert_ids": ((local,), U32), "gate_up": gate_up, "down": down}
        cases += [
            Case(f"moe_block {kind}", moe_block, moe, {**routing, "comm": comm}),
            Case(f"moe_router {kind}", moe_router, router, routing),
            Case(
                f"swiglu {kind}",
                swiglu,
                {"x": ((local, t, cfg.hidden_size), F32), "gate_up": gate_up, "down": down},
            ),
        ]
        if dequant_blocks is not None:
            cases += [
                _dequant_case(f"{name} {kind}", shape)
                for name, (shape, _) in (("gate_up", gate_up), ("down", down))
            ]
            # FP8 experts (codes and block scales) and replicated slots, through moe_block
            scales = {
                f"{name}_scale": (_grid(shape, parts), F32)
                for name, (shape, _), parts in (("gate_up", gate_up, 2), ("down", down, 1))
            }
            fp8 = {**moe, "gate_up": (gate_up[0], FP8), "down": (down[0], FP8), **scales}
            replicas = {**moe, "replica_index": ((local,), U32), "replica_count": ((local,), U32)}
            cases += [
                Case(f"moe_block fp8 experts {kind}", moe_block, fp8, {**routing, "comm": comm}),
                Case(f"moe_block replicas {kind}", moe_block, replicas, {**routing, "comm": comm}),
            ]
    else:
        mlp = {"x": x, "gate_up": arrays[f"{lp}/mlp/gate_up"], "down": arrays[f"{lp}/mlp/down"]}
        cases.append(Case(f"dense_mlp {kind}", dense_mlp, mlp, {"comm": comm}))
    return cases


def fused_cases(config: Path, devices: int, tokens: int, max_seq_len: int) -> list[Case]:
    """The fused device path's calls for one step of ``tokens`` (a bucket, or 1 for decode):
    embedding, one layer kernel per layer kind (bf16 caches), logits, the device-side pick."""
    cfg = load_config(config)
    arrays, layout = device_arrays(config, devices)
    comm, t, h = TraceComm(devices), tokens, cfg.hidden_size
    eps = cfg.rms_norm_eps
    cases = [
        Case("fused embedding", token_embedding, {"ids": ((t,), I32), "table": arrays["embed"]})
    ]
    for index in layer_kinds(cfg):
        spec, lp = cfg.layer(index), f"layers/{index}"
        kernel = LAYER[(spec.attention, spec.mlp)]
        a, static = _attention_inputs(cfg, index, arrays, layout, comm, t)
        a |= {k: arrays[f"{lp}/{k}"] for k in ("input_norm", "post_attn_norm")}
        static["eps"] = eps
        kv, d, dv = static["kv_heads"], spec.head_dim, spec.v_head_dim
        if spec.mlp == MOE:
            gate_up = arrays[f"{lp}/experts/gate_up"]
            a |= {
                "router_w": arrays[f"{lp}/router"],
                "choice_bias": arrays[f"{lp}/router_bias"],
                "expert_ids": ((gate_up[0][0],), U32),
                "gate_up": gate_up,
                "down": arrays[f"{lp}/experts/down"],
            }
            static |= {
                "top_k": cfg.num_experts_per_tok,
                "norm_topk": cfg.norm_topk_prob,
                "scaling": cfg.routed_scaling_factor,
            }
        else:
            a |= {"gate_up": arrays[f"{lp}/mlp/gate_up"], "down": arrays[f"{lp}/mlp/down"]}
        if spec.attention == FULL:
            a |= {
                "cache_k": ((max_seq_len, kv, d), BF16),
                "cache_v": ((max_seq_len, kv, dv), BF16),
                "write": ((t,), I32),
                "keep": ((t,), I32),
            }
        else:
            ring, w = spec.window - 1, min(t, spec.window - 1)
            a |= {
                "ring_k": ((ring, kv, d), BF16),
                "ring_v": ((ring, kv, dv), BF16),
                "ring_pos": ((ring,), I32),
                "src": ((w,), I32),
                "slots": ((w,), I32),
                "keep": ((w,), I32),
            }
            static["window"] = spec.window
        kind = f"{spec.attention}{'+sinks' if spec.sinks else ''}+{spec.mlp} L{index}"
        cases.append(
            Case(f"fused {kernel.__name__} {kind}", kernel, a, static, LAYER_STATE[kernel])
        )
    cases.append(
        Case(
            "fused final_logits",
            final_logits,
            {"x": ((t, h), F32), "norm_w": arrays["norm"], "lm_head_w": arrays["lm_head"]},
            {"eps": eps, "comm": comm},
        )
    )
    vocab = ((t, cfg.vocab_size), F32)
    top_k = min(SAMPLING["top_k"], cfg.vocab_size)
    pick = {"logits": vocab, "row": ((1,), I32), "u": ((1,), F32)}
    cases += [
        Case(
            "fused next_token greedy",
            next_token,
            pick,
            {"temperature": None, "top_k": top_k, "top_p": 1.0},
        ),
        Case("fused next_token sample", next_token, pick, {**SAMPLING, "top_k": top_k}),
    ]
    return cases


def _grid(shape: tuple[int, ...], parts: int) -> tuple[int, ...]:
    """Block-scale grid of an expert array of ``parts`` side-by-side weights (gate | up)."""
    *lead, k, n = shape
    return (*lead, -(-k // FP8_BLOCK), parts * -(-(n // parts) // FP8_BLOCK))


def _dequant_case(label: str, shape: tuple[int, ...]) -> Case:
    """FP8 codes of one expert weight (E_l, K, N) and their block scales."""
    *lead, k, n = shape
    grid = (*lead, -(-k // FP8_BLOCK), -(-n // FP8_BLOCK))
    arrays = {"codes": (tuple(shape), FP8), "scales": (grid, F32)}
    return Case(f"dequant_blocks {label}", dequant_blocks, arrays, {"block": FP8_BLOCK})


# ---------------------------------------------------------------------------------- tracing
def placeholder(spec: Spec) -> np.ndarray:
    """A read-only array of ``spec``'s shape and dtype that takes no memory (tracing reads
    shapes and dtypes only)."""
    shape, dtype = spec
    return np.broadcast_to(np.zeros((), dtype), shape)


def trace_case(case: Case) -> Result:
    """Trace ``case`` with nkipy, lower it to an HLO proto and check it against the backend."""
    from nkipy.core.trace import NKIPyKernel

    try:
        with warnings.catch_warnings():
            # an input dtype nkipy would downcast (float64, int64) is a signature bug
            warnings.filterwarnings("error", message=".*not supported by NeuronCore")
            module = NKIPyKernel.trace(case.kernel).specialize(
                **{k: placeholder(s) for k, s in case.arrays.items()}, **case.static
            )
            proto = module.to_proto()
    except Exception as e:  # noqa: BLE001 - any failure is the kernel's report
        return Result(case, Counter(), f"{type(e).__name__}: {e}")
    entry = next(c for c in proto.computations if c.id == proto.entry_computation_id)
    ops = Counter(i.opcode for i in entry.instructions)
    return Result(case, ops, check_module(case, module))


def check_module(case: Case, module: Any) -> str | None:
    """What in the traced ``module`` disagrees with the Neuron backend's contract, or None."""
    outputs = {o.name: (tuple(o.shape), np.dtype(o.dtype)) for o in module.outputs}
    aliased = {a.param_name for a in module.aliases}
    if aliased != set(case.state):
        return f"in-place inputs {sorted(aliased)}, the model passes state {sorted(case.state)}"
    rule = OUTPUT_RULES.get(case.kernel)
    if rule is not None:
        expected = rule(case.arrays, case.static)
        expected = (tuple(expected[0]), np.dtype(expected[1]))
        if outputs.get("output0") != expected:
            return f"output0 is {outputs.get('output0')}, OUTPUT_RULES say {expected}"
    return None


def untraced_kernels(cases: Iterable[Case]) -> list[str]:
    """Public functions of runtime/kernels that no case traces and NOT_TRACED does not excuse."""
    traced = {c.kernel.__name__ for c in cases}
    fused = any(c.kernel.__module__ == FUSED_MODULE for c in cases)
    missing = []
    for info in pkgutil.iter_modules(runtime.kernels.__path__):
        if f"runtime.kernels.{info.name}" == FUSED_MODULE and not fused:
            continue  # the fused path's kernels: checked with fused_cases (main does)
        mod = importlib.import_module(f"runtime.kernels.{info.name}")
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__ or name.startswith("_"):
                continue
            if name not in traced and name not in NOT_TRACED:
                missing.append(f"{info.name}.{name}")
    return missing


# ---------------------------------------------------------------------------------- report
def format_ops(ops: Counter) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


def print_table(title: str, results: list[Result]) -> None:
    print(f"\n== {title}")
    width = max(len(r.case.label) for r in results)
    for r in results:
        total = sum(r.ops.values())
        status = "ok" if r.error is None else "FAIL"
        print(f"  {r.case.label:<{width}}  {status:<4} {total:>5}  {format_ops(r.ops)}")
        if r.error is not None:
            print(f"  {'':<{width}}       {r.error}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--devices", type=int, nargs="+", default=[32, 64])
    p.add_argument("--prompt", type=int, nargs="+", default=[5, 37, 300])
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--json", type=Path, help="also write every op count to this file")
    args = p.parse_args(argv)
    try:
        import nkipy.core.trace  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the placeholder on PyPI raises ImportError
        print(f"nkipy is not importable ({e}): run make trace NKIPY_SRC=...", file=sys.stderr)
        return 2
    try:
        load_config(args.config)
    except (OSError, ValueError) as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    if any(n > args.max_seq_len for n in args.prompt):
        print(f"--prompt longer than --max-seq-len {args.max_seq_len}", file=sys.stderr)
        return 2

    start, failures, report = time.perf_counter(), 0, []
    sizes = buckets(args.max_seq_len)
    used = sorted({b for n in args.prompt for _, b in chunks(n, sizes)})
    for devices in args.devices:
        steps = [*(("prefill", n, False) for n in args.prompt), ("decode", 1, False)]
        steps += [*(("fused prefill bucket", b, True) for b in used), ("fused decode", 1, True)]
        for phase, tokens, fused in steps:
            try:
                make = fused_cases if fused else kernel_cases
                cases = make(args.config, devices, tokens, args.max_seq_len)
            except ValueError as e:  # e.g. --devices does not divide the heads
                print(f"--devices {devices}: {e}", file=sys.stderr)
                return 2
            results = [trace_case(c) for c in cases]
            failures += sum(r.error is not None for r in results)
            print_table(f"{devices} devices, {phase}, {tokens} token(s)", results)
            report += [
                {
                    "devices": devices,
                    "phase": phase,
                    "tokens": tokens,
                    "kernel": r.case.label,
                    "error": r.error,
                    "ops": dict(r.ops),
                }
                for r in results
            ]
            if fused:
                per_kind = len(cases)
    kernels = per_kind * (len(used) + 1)
    print(
        f"\nfused path: prompts of {', '.join(map(str, args.prompt))} tokens use buckets "
        f"{', '.join(map(str, used))} of {', '.join(map(str, sizes))}: {kernels} distinct "
        f"compiled kernels per rank ({per_kind} per bucket, decode included)"
    )
    cases = kernel_cases(args.config, args.devices[-1], 1, args.max_seq_len) + fused_cases(
        args.config, args.devices[-1], 1, args.max_seq_len
    )
    missing = untraced_kernels(cases)
    if missing:
        failures += len(missing)
        print(f"\nkernels not traced: {', '.join(missing)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(
        f"\n{len(report)} traces, {failures} failure(s), "
        f"{time.perf_counter() - start:.1f} s (trace + HLO proto, no compile)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
