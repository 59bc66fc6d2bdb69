"""Prefill and decode speed of the NumPy runtime against transformers eager, same weights, one run.

On the ``small`` synthetic checkpoint (8 layers, hidden 1024, 32 experts), converted for one
device once per expert dtype (``--expert-dtype``, default both: ``bfloat16`` experts, and the
checkpoint's FP8 codes with block scales, ``float8_e4m3fn``): the runtime reads the store's
memory maps (bfloat16, or float32 with ``--dtype float32``) and computes in float32;
transformers runs ``MiMoV2FlashForCausalLM`` in float32 (eager attention) with the same
dequantised weights (bf16-rounded for a bfloat16 store; FP8 experts unrounded, as the runtime
dequantises them), its KV cache and greedy decoding. Both process the same prompt and must
generate the same tokens. Each side runs ``--repeats`` times, interleaved; the best run of each
is reported (the machine is shared and noisy).

    python bench/decode.py [--prompt 128] [--new 32] [--devices 1] [--dtype bfloat16|float32]
                           [--expert-dtype bfloat16 float8_e4m3fn] [--repeats 3] [--threads 2]
                           [--work bench-out]

Prints, per store, tokens/s for both and their ratio (runtime / transformers; goal >= 1.0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.convert import convert  # noqa: E402
from pipeline.source import LocalSource  # noqa: E402
from pipeline.synth import preset_config, write_checkpoint  # noqa: E402
from runtime.ranks import InProcessRanks  # noqa: E402
from tests.oracle import load_transformers_model  # noqa: E402


def prepare(work: Path, devices: int, dtype: str, expert_dtype: str) -> tuple[Path, Path]:
    ckpt = work / "small"
    if not (ckpt / "model.safetensors.index.json").exists():
        write_checkpoint(ckpt, preset_config("small"), seed=0)
    suffix = "" if expert_dtype == "bfloat16" else f"-{expert_dtype}"
    out = work / f"small-out{devices}-{dtype}{suffix}"
    if not (out / "manifest.json").exists():
        convert(
            LocalSource(ckpt), out, devices, dtype=dtype, expert_dtype=expert_dtype, progress=False
        )
    return ckpt, out


def bench_runtime(model, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prefill tok/s, decode tok/s, greedy tokens) of the runtime."""
    t0 = time.perf_counter()
    logits = model.prefill(prompt)
    t1 = time.perf_counter()
    tok, out = int(logits[-1].argmax()), []
    t2 = time.perf_counter()
    for _ in range(new):
        out.append(tok)
        tok = int(model.decode(tok).argmax())
    t3 = time.perf_counter()
    return len(prompt) / (t1 - t0), new / (t3 - t2), out


def bench_transformers(model, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """The same for transformers eager with its own KV cache."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        cache, tok, toks = out.cache, int(out.logits[0, -1].argmax()), []
        t2 = time.perf_counter()
        for _ in range(new):
            toks.append(tok)
            out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
            cache, tok = out.cache, int(out.logits[0, -1].argmax())
        t3 = time.perf_counter()
    return len(prompt) / (t1 - t0), new / (t3 - t2), toks


def bench_store(args, expert_dtype: str) -> None:
    """Both sides on the store of ``expert_dtype``; prints one table."""
    ckpt, out = prepare(args.work, args.devices, args.dtype, expert_dtype)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, 4000, args.prompt)]
    rounding = torch.bfloat16 if args.dtype == "bfloat16" else None
    kw = {} if expert_dtype == "bfloat16" else {"expert_rounding": None}
    tf_model = load_transformers_model(ckpt, rounding=rounding, **kw)
    runs_ours, runs_theirs = [], []
    with InProcessRanks(out, max_seq_len=len(prompt) + args.new) as model:
        model.prefill(prompt[:8])  # warm-up: page in the weights
        with torch.no_grad():
            tf_model(torch.tensor([prompt[:8]]))
        for _ in range(args.repeats):
            runs_ours.append(bench_runtime(model, prompt, args.new))
            runs_theirs.append(bench_transformers(tf_model, prompt, args.new))
    ours = (max(r[0] for r in runs_ours), max(r[1] for r in runs_ours), runs_ours[0][2])
    theirs = (max(r[0] for r in runs_theirs), max(r[1] for r in runs_theirs), runs_theirs[0][2])
    same = ours[2] == theirs[2]
    print(
        f"small preset, {args.devices} device(s), {args.dtype} store, {expert_dtype} experts, "
        f"prompt {args.prompt}, {args.new} new tokens, best of {args.repeats}"
    )
    print(f"{'':14} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{'runtime':14} {ours[0]:>14.1f} {ours[1]:>13.2f}")
    print(f"{'transformers':14} {theirs[0]:>14.1f} {theirs[1]:>13.2f}")
    print(f"{'ratio':14} {ours[0] / theirs[0]:>14.2f} {ours[1] / theirs[1]:>13.2f}")
    print(f"greedy tokens identical: {same}")
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument(
        "--expert-dtype",
        nargs="+",
        choices=["bfloat16", "float8_e4m3fn", "float8_e4m3"],
        default=["bfloat16", "float8_e4m3fn"],
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    for expert_dtype in args.expert_dtype:
        bench_store(args, expert_dtype)


if __name__ == "__main__":
    main()
