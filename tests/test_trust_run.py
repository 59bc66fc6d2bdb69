"""mimo-run refuses what it cannot run correctly: ranks that disagree, peers that never arrive,
damaged weights, bad options; it says when an output is partial and never prints ids as nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from loader import open_device
from loader.format import SHARED
from pipeline.convert import convert
from pipeline.source import LocalSource
from runtime.cli import main
from runtime.model import RankModel
from tests.conftest import ROOT
from tests.test_run import IDS, free_port, last_json

OTHER_IDS = "5,17,250,3,99,1000,42,7,7,62"  # as long as IDS, one token differs


@pytest.fixture(scope="module")
def outs(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust-outs")
    out = {"1": root / "out1", "2": root / "out2", "layers": root / "layers"}
    convert(LocalSource(tiny_ckpt), out["1"], 1, progress=False)
    convert(LocalSource(tiny_ckpt), out["2"], 2, progress=False)
    convert(LocalSource(tiny_ckpt), out["layers"], 1, layers="0-2", progress=False)
    return out


def run(*args, env: dict[str, str] | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return res.exit_code, res.stdout + res.stderr


def one_line_error(code: int, text: str, *needles: str) -> None:
    """A user error: exit 2, one ``mimo-run: error:`` line naming what is wrong, no traceback."""
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("mimo-run: error:")]
    assert len(errors) == 1, text
    assert all(n in errors[0] for n in needles), text
    assert "Traceback" not in text


def rank_process(out: Path, rank: int, world: int, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    cmd = [sys.executable, "-m", "runtime.cli", str(out), "--device-rank", str(rank)]
    cmd += ["--world-size", str(world), "--max-new-tokens", "3", "--backend", "cpu", *extra]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# --------------------------------------------------------------------- 1. ranks must agree
def test_ranks_given_different_tokens_refuse_to_run(outs):
    port = free_port()
    procs = [
        rank_process(outs["2"], r, 2, port, "--input-ids", ids, "--json")
        for r, ids in enumerate([IDS, OTHER_IDS])
    ]
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        one_line_error(p.returncode, stderr, "ranks disagree on the input ids")
        assert stdout.strip() == ""  # nothing was generated


def test_ranks_given_different_sampling_refuse_to_run(outs):
    port = free_port()
    procs = [
        rank_process(outs["2"], r, 2, port, "--input-ids", IDS, "--temperature", t)
        for r, t in enumerate(["0.7", "0.8"])
    ]
    for p in procs:
        _, stderr = p.communicate(timeout=120)
        one_line_error(p.returncode, stderr, "the sampling options", "rank 1")


def test_agreement_over_threads_names_the_field():
    from runtime.comm import RanksDisagree, ThreadGroup, agree

    comms = ThreadGroup.create(3)
    errors: list[BaseException | None] = [None] * 3

    def rank(r: int) -> None:
        try:
            agree(comms[r], {"the input ids": [1, 2], "--max-new-tokens": 4 if r < 2 else 5})
        except RanksDisagree as e:
            errors[r] = e

    import threading

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all("ranks disagree on --max-new-tokens: rank 2 differ" in str(e) for e in errors)


def test_a_rank_whose_peers_never_arrive_names_them(outs):
    p = rank_process(outs["2"], 0, 2, free_port(), "--input-ids", IDS, "--startup-timeout", "3")
    _, stderr = p.communicate(timeout=120)
    one_line_error(p.returncode, stderr, "rank 1 of 2 never arrived", "--startup-timeout 3")


# ------------------------------------------------------------------ 2. non-finite logits
def test_nan_weights_stop_with_one_line(outs, tmp_path):
    out = Path(shutil.copytree(outs["1"], tmp_path / "out"))
    (chunk,) = (out / f"{SHARED}.zarr" / "norm").glob("c/*")
    chunk.write_bytes(np.full(chunk.stat().st_size // 2, 0x7FC0, "<u2").tobytes())  # bf16 NaN
    code, text = run(out, "--input-ids", IDS, "--max-new-tokens", "4", "--json")
    one_line_error(code, text, "non-finite logits at position 0", "mimo-manifest verify")


def test_nan_in_decode_names_the_position(outs):
    from runtime.generate import NonFiniteLogits, generate

    class Damaged:
        def __init__(self) -> None:
            self.model = RankModel(open_device(outs["1"], 0), max_seq_len=32)

        def prefill(self, ids):
            return self.model.prefill(ids)

        def decode(self, token):
            logits = self.model.decode(token)
            return logits if self.model.position < 12 else logits * np.nan

    ids = [int(t) for t in IDS.split(",")]
    with pytest.raises(NonFiniteLogits, match="at position 11"):
        generate(Damaged(), ids, 8)


# ---------------------------------------------------------------------- 3. user errors
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--logits-out", "no/such/folder/x.npy"], ["--logits-out", "does not exist"]),
        (["--max-seq-len", "1e11"], ["--max-seq-len"]),
        (["--max-seq-len", "100000000000"], ["--max-seq-len", "max_position_embeddings"]),
        (["--max-seq-len", "0"], ["--max-seq-len 0"]),
        (["--max-seq-len", "-5"], ["--max-seq-len -5"]),
        (["--temperature", "nan"], ["--temperature nan"]),
        (["--temperature", "-1"], ["--temperature -1"]),
        (["--temperature", "1", "--top-p", "0"], ["--top-p 0"]),
        (["--temperature", "1", "--top-p", "1.5"], ["--top-p 1.5"]),
        (["--temperature", "1", "--top-k", "0"], ["--top-k 0"]),
        (["--temperature", "1", "--top-k", "5000"], ["--top-k 5000", "1..1024"]),
        (["--top-p", "0.9"], ["--top-p needs --temperature"]),
        (["--top-k", "20"], ["--top-k needs --temperature"]),
        (["--max-new-tokens", "-1"], ["--max-new-tokens -1"]),
        (["--startup-timeout", "0"], ["--startup-timeout 0"]),
    ],
)
def test_bad_options_are_one_line(outs, args, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = run(outs["2"], "--all-ranks", "--input-ids", IDS, "--json", *args)
    one_line_error(code, text, *needles)
    assert not any(line.startswith("{") for line in text.splitlines())  # nothing generated


def test_missing_master_address_is_a_user_error(outs, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    code, text = run(outs["2"], "--input-ids", IDS, "--device-rank", "0", "--world-size", "2")
    one_line_error(code, text, "MASTER_ADDR")


def test_torchrun_with_the_wrong_process_count_names_nproc(outs):
    code, text = run(outs["2"], "--input-ids", IDS, env={"RANK": "0", "WORLD_SIZE": "3"})
    one_line_error(code, text, "torchrun started 3 processes", "--nproc-per-node 2")
    assert "--world-size" not in text


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_tokenizer_is_named(outs, tmp_path, damage):
    out = Path(shutil.copytree(outs["1"], tmp_path / "out"))
    path = out / "tokenizer.json"
    path.write_text("{not json" if damage == "garbage" else path.read_text()[:500])
    code, text = run(out, "--prompt", "hello", "--max-new-tokens", "2")
    one_line_error(code, text, "tokenizer.json")


def test_debug_shows_the_traceback(outs):
    code, text = run(outs["1"], "--input-ids", IDS, "--max-seq-len", "4", "--debug")
    assert code == 2 and "Traceback" in text and "--max-seq-len 4" in text


# ------------------------------------------------------------------ 4. partial outputs
def test_layer_subset_says_layers_are_missing(outs):
    args = [outs["layers"], "--input-ids", IDS, "--max-new-tokens", "2"]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "--json"]])
    assert res.exit_code == 0, res.stderr
    assert "note: 4 of 7 layers are missing" in res.stderr
    notices = last_json(res.stdout)["notices"]
    assert any("4 of 7 layers are missing" in n for n in notices)
    assert not any("routing restricted" in n for n in notices)  # every expert was converted
    code, human = run(*args)
    assert code == 0 and "note: 4 of 7 layers are missing" in human


def test_full_output_has_no_notices(outs):
    code, text = run(outs["1"], "--input-ids", IDS, "--max-new-tokens", "2", "--json")
    assert code == 0 and last_json(text)["notices"] == [] and "note:" not in text


# ------------------------------------------------------------ 5. every id is printable
def test_ids_the_tokenizer_lacks_print_a_placeholder(outs, tmp_path):
    from pipeline.tokenizer import build_tokenizer

    out = Path(shutil.copytree(outs["1"], tmp_path / "out"))
    build_tokenizer(300).save(str(out / "tokenizer.json"))  # covers ids 0..299 of 1024
    code, text = run(out, "--input-ids", IDS, "--max-new-tokens", "8", "--json")
    assert code == 0, text
    doc = last_json(text)
    unknown = [i for i in doc["output_ids"] if i >= 300]
    assert unknown, doc  # the setting is meaningful: some generated ids lack a token
    assert all(f"<id {i}>" in doc["text"] for i in unknown)
    code, human = run(out, "--input-ids", IDS, "--max-new-tokens", "2")
    assert code == 0 and "<id 1000>" in human  # the prompt's id 1000 too


# ------------------------------------------------------------------ 6. prefill progress
def test_prefill_reports_each_layer(outs):
    from runtime.ranks import InProcessRanks

    ids = [int(t) for t in IDS.split(",")]
    calls: list[tuple[int, int]] = []
    model = RankModel(open_device(outs["1"], 0), max_seq_len=32)
    plain = model.prefill(ids)
    tracked = model.prefill(ids, lambda done, total: calls.append((done, total)))
    assert calls == [(i, 7) for i in range(1, 8)]
    assert np.array_equal(plain, tracked)
    calls.clear()
    with InProcessRanks(outs["2"], max_seq_len=32) as ranks:
        ranks.prefill(ids, lambda done, total: calls.append((done, total)))
    assert calls == [(i, 7) for i in range(1, 8)]  # rank 0 only reports


def test_no_progress_when_not_a_terminal(outs):
    code, text = run(outs["1"], "--input-ids", IDS, "--max-new-tokens", "2")
    assert code == 0 and "prefill: layer" not in text and "time to first token" in text
    code, text = run(outs["1"], "--input-ids", IDS, "--max-new-tokens", "2", "--quiet")
    assert code == 0 and "time to first token" not in text


def test_progress_and_time_to_first_token_on_a_terminal(outs):
    """Under a pseudo-terminal stderr shows each prefill layer, then the time to first token."""
    import pty

    cmd = [sys.executable, "-m", "runtime.cli", str(outs["1"]), "--input-ids", IDS]
    leader, follower = pty.openpty()
    p = subprocess.Popen(
        [*cmd, "--max-new-tokens", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed
            break
        if not data:
            break
        chunks.append(data)
    p.communicate(timeout=120)
    os.close(leader)
    err = b"".join(chunks).decode()
    assert p.returncode == 0, err
    assert all(f"prefill: layer {i}/7" in err for i in range(1, 8))
    assert "time to first token" in err


def test_plain_output_separates_prompt_and_completion(tiny_ckpt, tmp_path):
    """Without --json: the prompt on one line, the completion on the next, no styling when
    stdout is not a terminal."""
    import json

    from click.testing import CliRunner

    from pipeline.convert import convert
    from pipeline.source import LocalSource
    from runtime.cli import main

    out = tmp_path / "out"
    convert(LocalSource(tiny_ckpt), out, 1, progress=False)
    args = [str(out), "--prompt", "The river ran low", "--max-new-tokens", "5", "--quiet"]
    plain = CliRunner().invoke(main, args)
    data = CliRunner().invoke(main, args + ["--json"])
    assert plain.exit_code == 0 and data.exit_code == 0, plain.output + data.output
    lines = plain.stdout.splitlines()
    text = json.loads(data.stdout.strip().splitlines()[-1])["text"]
    assert lines[0] == "The river ran low" and "\n".join(lines[1:]) == text
    assert "\x1b[" not in plain.stdout
