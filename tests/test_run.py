"""mimo-run: processes on loopback equal in-process ranks; generation equals transformers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.convert import convert
from pipeline.source import LocalSource
from runtime.cli import main
from tests.conftest import ROOT
from tests.oracle import load_transformers_model

IDS = "5,17,250,3,99,1000,42,7,7,61"  # 10 tokens; with 16 new ones the window (17) is crossed


@pytest.fixture(scope="module")
def outs(tiny_ckpt, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("run-outs")
    out = {}
    for n in (1, 2, 4):
        out[n] = root / f"out{n}"
        convert(LocalSource(tiny_ckpt), out[n], n, progress=False)
    return out


def run(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stdout + res.stderr


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def close(a: np.ndarray, b: np.ndarray) -> None:
    """The same logits up to float32 summation order (1e-5 of the logit scale)."""
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out: Path, world: int, extra: list[str], tmp: Path, torchrun: bool = False) -> list[str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    base = [
        str(out),
        "--input-ids",
        IDS,
        "--max-new-tokens",
        "6",
        "--json",
        "--backend",
        "cpu",
        *extra,
    ]
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(world),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            env["MASTER_PORT"],
            "-m",
            "runtime.cli",
            *base,
            "--logits-out",
            str(tmp / "logits-torchrun.npy"),
        ]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        return [res.stdout]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.cli",
                *base,
                "--device-rank",
                str(r),
                "--world-size",
                str(world),
                "--logits-out",
                str(tmp / f"logits-{r}.npy"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r in range(world)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outs.append(stdout)
    return outs


@pytest.mark.parametrize("world", [2, 4])
def test_processes_on_loopback_equal_all_ranks(outs, tmp_path, world):
    code, text = run(
        outs[world],
        "--all-ranks",
        "--input-ids",
        IDS,
        "--max-new-tokens",
        "6",
        "--json",
        "--logits-out",
        tmp_path / "all.npy",
    )
    assert code == 0, text
    want = last_json(text)
    stdouts = spawn(outs[world], world, [], tmp_path)
    got = last_json(stdouts[0])
    assert got["output_ids"] == want["output_ids"] and got["input_ids"] == want["input_ids"]
    assert got["ranks"] == {"mode": "dist", "world_size": world}
    # sums run in rank order in both; BLAS blocking may still differ with the thread count
    close(np.load(tmp_path / "logits-0.npy"), np.load(tmp_path / "all.npy"))
    assert all(s.strip() == "" for s in stdouts[1:])  # only rank 0 prints
    assert not (tmp_path / "logits-1.npy").exists()


def test_torchrun_launch(outs, tmp_path):
    (stdout,) = spawn(outs[2], 2, [], tmp_path, torchrun=True)
    code, text = run(
        outs[2],
        "--all-ranks",
        "--input-ids",
        IDS,
        "--max-new-tokens",
        "6",
        "--json",
        "--logits-out",
        tmp_path / "all.npy",
    )
    assert last_json(stdout)["output_ids"] == last_json(text)["output_ids"]
    close(np.load(tmp_path / "logits-torchrun.npy"), np.load(tmp_path / "all.npy"))


@pytest.mark.parametrize("devices", [1, 4])
def test_greedy_generation_equals_transformers_generate(tiny_ckpt, outs, devices):
    ids = [int(t) for t in IDS.split(",")]
    model = load_transformers_model(tiny_ckpt)
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([ids]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=0,
        )
    want = gen[0, len(ids) :].tolist()
    code, text = run(
        outs[devices], "--input-ids", IDS, "--max-new-tokens", "16", "--greedy", "--json"
    )
    assert code == 0, text
    got = last_json(text)
    assert got["output_ids"] == want
    assert len(ids) + len(want) > 17  # the sliding window was crossed


def test_sampling_is_reproducible_with_seed(outs):
    args = [
        outs[2],
        "--all-ranks",
        "--input-ids",
        IDS,
        "--max-new-tokens",
        "12",
        "--json",
        "--temperature",
        "1.5",
        "--top-k",
        "200",
        "--top-p",
        "0.95",
    ]
    a = last_json(run(*args, "--seed", "7")[1])["output_ids"]
    b = last_json(run(*args, "--seed", "7")[1])["output_ids"]
    c = last_json(run(*args, "--seed", "8")[1])["output_ids"]
    greedy = last_json(run(outs[2], "--input-ids", IDS, "--max-new-tokens", "12", "--json")[1])[
        "output_ids"
    ]
    assert a == b and len(a) == 12  # the same seed, the same tokens
    assert a != c  # another seed draws other tokens (12 draws at temperature 1.5)
    assert a != greedy  # sampling is not argmax


def test_prompt_text_and_json(outs):
    code, text = run(
        outs[4], "--prompt", "The river ran low that summer", "--max-new-tokens", "5", "--json"
    )
    assert code == 0, text
    doc = last_json(text)
    assert set(doc) >= {"input_ids", "output_ids", "text", "timings"}
    assert set(doc["timings"]) >= {
        "time_to_first_token_s",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    }
    assert isinstance(doc["text"], str) and len(doc["output_ids"]) == 5
    code, human = run(outs[4], "--prompt", "The river ran low", "--max-new-tokens", "3")
    assert code == 0 and "The river ran low" in human and "time to first token" in human


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-rank", "2", "--world-size", "2"], "--device-rank 2 is outside 0..1"),
        (
            ["--device-rank", "0", "--world-size", "3"],
            "--world-size 3 does not match the output's 2 devices",
        ),
        (["--input-ids", "1,2,1024"], "token id 1024 is outside the vocabulary"),
        (["--max-seq-len", "4"], "the prompt has 10 tokens, more than --max-seq-len 4"),
        (["--greedy", "--temperature", "0.7"], "exclude each other"),
    ],
)
def test_bad_input_fails_cleanly(outs, args, message):
    base = [outs[2]] + ([] if "--input-ids" in args else ["--input-ids", IDS])
    code, text = run(*base, *args)
    assert code != 0 and message in text and "Traceback" not in text


def test_incomplete_output_and_missing_tokenizer(outs, tmp_path):
    broken = Path(shutil.copytree(outs[1], tmp_path / "out"))
    (broken / "tokenizer.json").unlink()
    code, text = run(broken, "--prompt", "hello")
    assert code == 2 and "no tokenizer.json" in text
    (broken / "manifest.json").unlink()
    code, text = run(broken, "--input-ids", "1,2")
    assert code == 2 and "incomplete" in text


def test_rendezvous_without_master_address(outs, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    code, text = run(outs[2], "--input-ids", IDS, "--device-rank", "0", "--world-size", "2")
    assert code != 0 and "MASTER_ADDR" in text


def test_make_demo_generates_text(tmp_path):
    res = subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO={tmp_path / 'demo'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verified" in res.stdout and "all match" in res.stdout
    assert "MiMoV2FlashForCausalLM" in res.stdout  # the manifest was shown
    doc = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert len(doc["output_ids"]) > 0 and isinstance(doc["text"], str)


def test_generation_stops_at_the_generation_config_eos(outs, tmp_path):
    """The real config has no eos_token_id; generation_config.json's is used (a list too)."""
    out = Path(shutil.copytree(outs[1], tmp_path / "out"))
    free = last_json(run(out, "--input-ids", IDS, "--max-new-tokens", "12", "--json")[1])
    tokens = free["output_ids"]
    stop = next(i for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [10**6, tokens[stop]]}))
    doc = last_json(run(out, "--input-ids", IDS, "--max-new-tokens", "12", "--json")[1])
    assert doc["output_ids"] == tokens[: stop + 1] and doc["stopped"] == "eos"
