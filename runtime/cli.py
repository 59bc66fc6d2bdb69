"""``mimo-run OUT``: generate with a converted model, one rank per process or all ranks in one.

Modes:

- ``--device-rank N --world-size W`` (or under ``torchrun``, from ``RANK``/``WORLD_SIZE``): this
  process runs rank N; ranks meet through ``torch.distributed`` (gloo, ``env://``).
- ``--all-ranks``: every rank of the output in this process (one thread each).
- neither: a one-device output runs as one rank; a larger one runs all ranks in this process.

Rank 0 prints; ``--json`` makes its last stdout line one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from loader import LoaderError, open_device
from loader.manifest import read_manifest
from runtime.generate import Generation, Sampling, generate
from runtime.model import RankModel, SequenceTooLong


class RunError(Exception):
    """Bad input to mimo-run; printed as ``mimo-run: error: ...`` with exit code 2."""


def _tokenizer(out: Path):
    path = out / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def eos_token_ids(out: Path, config_eos: int | None, tok) -> frozenset[int]:
    """End-of-sequence ids: the config's, ``generation_config.json``'s and the tokenizer's.

    The real MiMo-V2-Flash config has no ``eos_token_id``; its generation config and tokenizer do.
    """
    ids = set() if config_eos is None else {config_eos}
    gen = _json(out / "generation_config.json").get("eos_token_id")
    ids.update(gen if isinstance(gen, list) else [gen] if isinstance(gen, int) else [])
    token = _json(out / "tokenizer_config.json").get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    if tok is not None and isinstance(token, str) and tok.token_to_id(token) is not None:
        ids.add(tok.token_to_id(token))
    return frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _input_ids(out: Path, prompt: str | None, input_ids: str | None, vocab: int, tok) -> list[int]:
    if (prompt is None) == (input_ids is None):
        raise RunError("give exactly one of --prompt TEXT or --input-ids 1,2,3")
    if prompt is not None:
        if tok is None:
            raise RunError(
                f"{out}: no tokenizer.json (the source had no tokenizer files); use --input-ids"
            )
        ids = tok.encode(prompt).ids
    else:
        try:
            ids = [int(t) for t in input_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise RunError(
                f"--input-ids {input_ids!r}: not a comma-separated list of integers"
            ) from None
    if not ids:
        raise RunError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise RunError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    return ids


def _mode(device_rank, world_size, all_ranks, devices) -> tuple[str, int, int]:
    """('single' | 'threads' | 'dist', rank, world)."""
    env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if all_ranks:
        if device_rank is not None or world_size is not None:
            raise RunError(
                "--all-ranks runs every rank: do not combine it with --device-rank/--world-size"
            )
        return "threads", 0, devices
    if device_rank is None and env_rank is not None:  # torchrun
        device_rank, world_size = int(env_rank), int(env_world or 1)
    if device_rank is None:
        if world_size is not None:
            raise RunError("--world-size needs --device-rank")
        return ("single" if devices == 1 else "threads"), 0, devices
    world_size = world_size if world_size is not None else devices
    if not 0 <= device_rank < world_size:
        raise RunError(
            f"--device-rank {device_rank} is outside 0..{world_size - 1} "
            f"(--world-size {world_size})"
        )
    if world_size != devices:
        raise RunError(f"--world-size {world_size} does not match the output's {devices} devices")
    return ("single" if world_size == 1 else "dist"), device_rank, world_size


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device-rank", type=int, default=None, help="Run this rank (one process per rank).")
@click.option(
    "--world-size", type=int, default=None, help="Ranks in the run (the output's devices)."
)
@click.option("--all-ranks", is_flag=True, help="Run every rank in this process.")
@click.option("--prompt", default=None, help="Prompt text (needs the output's tokenizer).")
@click.option("--input-ids", default=None, help="Prompt as token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--greedy", is_flag=True, help="Argmax decoding (the default).")
@click.option("--temperature", type=float, default=None, help="Sample at this temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--logits-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Rank 0 writes the float32 prompt logits [T, vocab] here (.npy).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Rank 0's last stdout line is one JSON object."
)
@click.option(
    "--backend", type=click.Choice(["auto", "cpu", "neuron"]), default="auto", show_default=True
)
@click.option(
    "--max-seq-len",
    type=int,
    default=None,
    help="KV cache length (default: prompt + max new tokens).",
)
@click.option("--verify", is_flag=True, help="Recompute the device's checksums before running.")
def main(
    out,
    device_rank,
    world_size,
    all_ranks,
    prompt,
    input_ids,
    max_new_tokens,
    greedy,
    temperature,
    top_p,
    top_k,
    seed,
    logits_out,
    as_json,
    backend,
    max_seq_len,
    verify,
) -> None:
    """Generate text with the converted model in OUT."""
    comm = None
    try:
        if greedy and temperature is not None:
            raise RunError("--greedy and --temperature exclude each other")
        if max_new_tokens < 0:
            raise RunError("--max-new-tokens must be >= 0")
        sampling = Sampling(temperature, top_k, top_p, seed)
        manifest = read_manifest(out)
        devices = manifest["options"]["devices"]
        mode, rank, world = _mode(device_rank, world_size, all_ranks, devices)
        from mimo.config import MiMoConfig

        cfg = MiMoConfig.from_dict(manifest["model"]["config"])
        tok = _tokenizer(out)
        ids = _input_ids(out, prompt, input_ids, cfg.vocab_size, tok)
        seq_len = max_seq_len or len(ids) + max(max_new_tokens, 1)
        if len(ids) > seq_len:
            raise RunError(f"the prompt has {len(ids)} tokens, more than --max-seq-len {seq_len}")
        model, comm = _build(out, mode, rank, world, seq_len, backend, verify, manifest)
        eos = eos_token_ids(out, cfg.eos_token_id, tok)
        result = generate(model, ids, max_new_tokens, sampling, eos, seq_len)
        if rank == 0:
            _report(result, tok, logits_out, as_json, model.notices, mode, world)
    except (RunError, LoaderError, SequenceTooLong, ValueError) as e:
        click.echo(f"mimo-run: error: {e}", err=True)
        sys.exit(2)
    except RuntimeError as e:  # backend or rendezvous problems
        click.echo(f"mimo-run: error: {e}", err=True)
        sys.exit(1)
    finally:
        if comm is not None and hasattr(comm, "close"):
            comm.close()


def _build(out, mode, rank, world, seq_len, backend, verify, manifest):
    from runtime.neuron import select_backend

    if mode == "threads":
        from runtime.ranks import InProcessRanks

        model = InProcessRanks(
            out,
            max_seq_len=seq_len,
            verify=verify,
            backend_factory=lambda r: select_backend(backend, r, world),
        )
        return model, model
    comm = None
    if mode == "dist":
        from runtime.dist import TorchDistributed

        comm = TorchDistributed(rank, world)
    dev = open_device(out, rank, verify=verify, manifest=manifest)
    return RankModel(
        dev, comm, max_seq_len=seq_len, backend=select_backend(backend, rank, world)
    ), comm


def _report(result: Generation, tok, logits_out, as_json, notices, mode, world) -> None:
    if logits_out is not None:
        np.save(logits_out, result.prompt_logits.astype(np.float32))
    text = tok.decode(result.output_ids) if tok is not None else None
    t = result.timings
    for n in notices:
        click.echo(f"note: {n}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "input_ids": result.input_ids,
                    "output_ids": result.output_ids,
                    "text": text,
                    "stopped": result.stopped,
                    "ranks": {"mode": mode, "world_size": world},
                    "timings": {k: round(v, 6) for k, v in t.items()},
                }
            )
        )
        return
    if tok is not None:
        click.echo(tok.decode(result.input_ids) + click.style(text or "", bold=True))
    else:
        click.echo(" ".join(map(str, result.output_ids)))
    click.echo(
        f"[{len(result.input_ids)} prompt tokens, {len(result.output_ids)} generated "
        f"({result.stopped}); "
        f"time to first token {t['time_to_first_token_s'] * 1000:.0f} ms, prefill "
        f"{t['prefill_tokens_per_s']:.1f} tok/s, decode {t['decode_tokens_per_s']:.2f} tok/s; "
        f"{world} rank{'s' if world > 1 else ''} ({mode})]",
        err=True,
    )


if __name__ == "__main__":
    main()
