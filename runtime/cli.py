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
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from loader import LoaderError, open_device
from loader.manifest import held_elsewhere, read_manifest
from loader.usage import OneLineUsage
from mimo import hbm, routing
from mimo.hbm import DoesNotFit
from runtime.dist import RendezvousError
from runtime.generate import Generation, Sampling, generate
from runtime.model import RankModel, SequenceTooLong


class RunError(Exception):
    """Bad input to mimo-run; printed as ``mimo-run: error: ...`` with exit code 2."""


def _tokenizer(out: Path):
    path = out / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise RunError(f"{path}: not a readable tokenizer ({why}); reconvert the output") from None


def decode(tok, ids: list[int]) -> str:
    """The text of ``ids``; an id the tokenizer cannot decode shows as ``<id N>``.

    Runs of decodable ids are decoded together (multi-byte characters stay whole).
    """
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if tok.id_to_token(i) is not None:
            run.append(i)
            continue
        if run:
            parts.append(tok.decode(run))
            run = []
        parts.append(f"<id {i}>")
    if run:
        parts.append(tok.decode(run))
    return "".join(parts)


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
        try:
            rank, world = int(env_rank), int(env_world or 1)
        except ValueError:
            raise RunError(f"RANK={env_rank!r} WORLD_SIZE={env_world!r}: not integers") from None
        if world != devices:
            raise RunError(
                f"torchrun started {world} processes but the output has {devices} devices: "
                f"use --nproc-per-node {devices}"
            )
        if world_size is not None and world_size != world:
            raise RunError(f"--world-size {world_size} differs from torchrun's WORLD_SIZE {world}")
        return ("single" if world == 1 else "dist"), rank, world
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


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


# option -> (holds(value, limits), what it must be); limits: vocab, positions
CHECKS: dict[str, tuple[Callable[[object, dict[str, int]], bool], str]] = {
    "--max-new-tokens": (lambda v, m: v >= 0, "must be >= 0"),
    "--temperature": (lambda v, m: _positive(v), "must be a number > 0 (or use --greedy)"),
    "--top-p": (lambda v, m: 0 < v <= 1, "must be in (0, 1]"),
    "--top-k": (lambda v, m: 1 <= v <= m["vocab"], "must be in 1..{vocab} (the vocabulary)"),
    "--max-seq-len": (
        lambda v, m: 1 <= v <= m["positions"],
        "must be in 1..{positions} (the model's max_position_embeddings)",
    ),
    "--startup-timeout": (lambda v, m: _positive(v), "must be a number of seconds > 0"),
}
NEEDS_TEMPERATURE = ("--top-p", "--top-k")  # sampling filters: greedy decoding ignores them


def check_options(given: dict[str, object], limits: dict[str, int]) -> None:
    """Raise RunError naming the first option in ``given`` (None: not given) that is invalid."""
    for option, (holds, must) in CHECKS.items():
        value = given.get(option)
        if value is not None and not holds(value, limits):
            raise RunError(f"{option} {value}: {must.format(**limits)}")
    if given.get("--temperature") is None:
        for option in NEEDS_TEMPERATURE:
            if given.get(option) is not None:
                raise RunError(f"{option} needs --temperature (greedy decoding ignores it)")


def check_logits_out(path: Path | None) -> None:
    """The folder of ``--logits-out`` exists and is writable (checked before generating)."""
    if path is None:
        return
    folder = path.parent
    if path.is_dir():
        raise RunError(f"--logits-out {path}: is a folder; give a file name (.npy)")
    if not folder.is_dir():
        raise RunError(f"--logits-out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise RunError(f"--logits-out {path}: the folder {folder} is not writable")


def _layer_progress(done: int, total: int) -> None:
    click.echo(f"\rprefill: layer {done}/{total}", err=True, nl=done == total)


@click.command(
    cls=OneLineUsage,
    prog="mimo-run",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
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
@click.option(
    "--top-p", type=float, default=None, help="Nucleus sampling (with --temperature) [1.0]."
)
@click.option(
    "--top-k",
    type=int,
    default=None,
    help="Sample among the k likeliest (with --temperature) [50].",
)
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
@click.option(
    "--lnc",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="Trainium2 logical NeuronCore per rank: 1 (12 GiB of HBM) or 2 (24 GiB).",
)
@click.option(
    "--plan",
    "show_plan",
    is_flag=True,
    help="Print the HBM plan of a rank (weights, KV cache, activations, scratch) and exit.",
)
@click.option("--verify", is_flag=True, help="Recompute the device's checksums before running.")
@click.option(
    "--startup-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a rank waits for the other ranks' processes to arrive.",
)
@click.option(
    "--prompt-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A corpus: one prompt per line (text, or token ids 1,2,3 without a tokenizer); each is "
    "prefilled, none generated.",
)
@click.option(
    "--record-routing",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Count the tokens routed to each expert per MoE layer into this JSON file (added to "
    "it when it holds statistics of the same model); input of `mimo-shard plan-experts`.",
)
@click.option("--quiet", is_flag=True, help="No progress and no timings on stderr.")
@click.option("--debug", is_flag=True, help="Show the traceback of errors.")
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
    lnc,
    show_plan,
    verify,
    startup_timeout,
    prompt_file,
    record_routing,
    quiet,
    debug,
) -> None:
    """Generate text with the converted model in OUT."""
    comm = None
    try:
        if greedy and temperature is not None:
            raise RunError("--greedy and --temperature exclude each other")
        check_logits_out(logits_out)
        manifest = read_manifest(out)
        devices = manifest["options"]["devices"]
        from mimo.config import MiMoConfig

        cfg = MiMoConfig.from_dict(manifest["model"]["config"])
        limits = {"vocab": cfg.vocab_size, "positions": cfg.max_position_embeddings}
        given = {
            "--max-new-tokens": max_new_tokens,
            "--temperature": temperature,
            "--top-p": top_p,
            "--top-k": top_k,
            "--max-seq-len": max_seq_len,
            "--startup-timeout": startup_timeout,
        }
        check_options(given, limits)
        sampling = Sampling(
            temperature, 50 if top_k is None else top_k, 1.0 if top_p is None else top_p, seed
        )
        if show_plan:
            _print_plan(manifest, cfg, max_seq_len or 4096, int(lnc), as_json)
            return
        mode, rank, world = _mode(device_rank, world_size, all_ranks, devices)
        for r in range(world) if mode == "threads" else (rank,):  # one host's part: its ranks
            elsewhere = held_elsewhere(manifest, r)
            if elsewhere:
                raise RunError(f"{out}: {elsewhere}")
        tok = _tokenizer(out)
        corpus = None
        if prompt_file is not None:
            if prompt is not None or input_ids is not None:
                raise RunError("--prompt-file replaces --prompt/--input-ids: give one")
            corpus = _corpus(prompt_file, cfg.vocab_size, tok)
            ids = max(corpus, key=len)
        else:
            ids = _input_ids(out, prompt, input_ids, cfg.vocab_size, tok)
        seq_len = max_seq_len or len(ids) + max(max_new_tokens, 1)
        if len(ids) > seq_len:
            raise RunError(f"the prompt has {len(ids)} tokens, more than --max-seq-len {seq_len}")
        agreed = {
            # one host's part of a multi-host output: the layout every host's part shares
            "the output (manifest fingerprint)": manifest.get("hosts", {}).get("layout")
            or manifest.get("fingerprint"),
            "the input ids": corpus or ids,
            "the sampling options": [sampling.temperature, sampling.top_k, sampling.top_p, seed],
            "--max-seq-len": seq_len,
            "--max-new-tokens": max_new_tokens,
        }
        if mode == "dist" and not debug:
            os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # c10d's own timeout dumps
        serving = (backend, int(lnc), cfg)
        model, comm = _build(
            out, mode, rank, world, seq_len, serving, verify, manifest, agreed, startup_timeout
        )
        eos = eos_token_ids(out, cfg.eos_token_id, tok)
        show = rank == 0 and not (quiet or as_json) and sys.stderr.isatty()
        on_layer = _layer_progress if show else None
        stats = _record(model, rank, cfg) if record_routing is not None else None
        if corpus is not None:
            for prompt_ids in corpus:
                model.prefill(prompt_ids)
            if stats is not None:
                stats["prompts"] += len(corpus)
                stats["tokens"] += sum(map(len, corpus))
        else:
            result = generate(model, ids, max_new_tokens, sampling, eos, seq_len, on_layer)
            if stats is not None:
                stats["prompts"] += 1
                stats["tokens"] += len(result.input_ids) + max(len(result.output_ids) - 1, 0)
        if stats is not None:
            merged = routing.merge(record_routing, stats)
            record_routing.write_text(json.dumps(merged, indent=1) + "\n")
            if not quiet:
                added = f"routing of {stats['tokens']} tokens added to {record_routing}"
                click.echo(added, err=True)
        if rank == 0 and corpus is None:
            _report(result, tok, logits_out, as_json, quiet, model.notices, mode, world)
    except (RunError, LoaderError, SequenceTooLong, ValueError, RendezvousError, DoesNotFit) as e:
        _fail(e, 2, debug)
    except RuntimeError as e:  # backend problems
        _fail(e, 1, debug)
    finally:
        if comm is not None and hasattr(comm, "close"):
            comm.close()


def _corpus(path: Path, vocab: int, tok) -> list[list[int]]:
    """``--prompt-file``: the token ids of each non-empty line."""
    try:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise RunError(f"--prompt-file {path}: cannot read ({why})") from None
    if not lines:
        raise RunError(f"--prompt-file {path}: no prompts (one per line)")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            if tok is not None:
                out.append(_input_ids(path, line, None, vocab, tok))
            else:
                out.append(_input_ids(path, None, line, vocab, tok))
        except RunError as e:
            raise RunError(f"--prompt-file {path}: line {n}: {e}") from None
    return out


def _record(model, rank: int, cfg) -> dict | None:
    """Statistics that rank 0's model fills as it routes (every rank routes every token
    alike, so rank 0 sees all of it); None on the other ranks."""
    if rank != 0:
        return None
    target = getattr(model, "model", model)  # all ranks in threads, or a resident model
    if hasattr(model, "pick") or not hasattr(target, "on_routing"):
        raise RunError("--record-routing needs the CPU backend (--backend cpu)")
    stats = routing.empty(cfg, [layer.spec.index for layer in target.layers])

    def on_routing(layer: int, weights, idx) -> None:
        routing.add(stats, layer, weights, idx)

    target.on_routing = on_routing
    return stats


def _fail(error: Exception, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exception(error)
    click.echo(f"mimo-run: error: {error}", err=True)
    sys.exit(code)


def _print_plan(manifest: dict, cfg, max_seq_len: int, lnc: int, as_json: bool) -> None:
    """``--plan``: the HBM plan of one rank of this output (text, or ``{"hbm": ...}``)."""
    p = hbm.plan_from_manifest(manifest, cfg, max_seq_len, lnc)
    if as_json:
        click.echo(json.dumps({"hbm": p}, indent=1))
    else:
        click.echo(hbm.render(p))


def _build(out, mode, rank, world, seq_len, serving, verify, manifest, agreed, startup_timeout):
    """(model, communicator to close); the ranks have agreed on ``agreed`` (RanksDisagree).

    On the Neuron backend the placement's HBM is checked first (:class:`DoesNotFit` names what
    to change) and the model runs resident on the device, sampling there."""
    from runtime.comm import agree
    from runtime.neuron import select_backend

    backend, lnc, cfg = serving

    if mode == "threads":
        from runtime.ranks import InProcessRanks

        model = InProcessRanks(
            out,
            max_seq_len=seq_len,
            verify=verify,
            backend_factory=lambda r: select_backend(backend, r, world, lnc=lnc),
        )
        try:
            model.agree(agreed)
        except BaseException:
            model.close()
            raise
        return model, model
    comm = None
    if mode == "dist":
        from runtime.dist import TorchDistributed

        comm = TorchDistributed(rank, world, startup_timeout_s=startup_timeout)
        try:
            agree(comm, agreed)
        except BaseException:
            comm.close()
            raise
    chosen = select_backend(backend, rank, world, lnc=lnc)
    if chosen.name == "neuron":
        fp8 = "expert_dtype" in manifest["options"]
        hbm.check(hbm.plan_from_manifest(manifest, cfg, seq_len, lnc), fp8_experts=fp8)
    dev = open_device(out, rank, verify=verify, manifest=manifest)
    model = RankModel(dev, comm, max_seq_len=seq_len, backend=chosen)
    if chosen.name == "neuron":
        from runtime.resident import ResidentModel

        model = ResidentModel(model, chosen)
    return model, comm


def _report(result: Generation, tok, logits_out, as_json, quiet, notices, mode, world) -> None:
    if logits_out is not None:
        np.save(logits_out, result.prompt_logits.astype(np.float32))
    text = decode(tok, result.output_ids) if tok is not None else None
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
                    "notices": list(notices),
                    "ranks": {"mode": mode, "world_size": world},
                    "timings": {k: round(v, 6) for k, v in t.items()},
                }
            )
        )
        return
    if tok is not None:  # the prompt, then the completion on its own line (bold on a terminal)
        click.echo(decode(tok, result.input_ids))
        click.echo(click.style(text or "", bold=True))
    else:
        click.echo(" ".join(map(str, result.output_ids)))
    if quiet:
        return
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
