"""Multi-host conversion: each host writes, and reads, only what its own devices hold.

Against the local Hub stand-in (tests/hubserver.py) and from a folder: every host's stores equal
the same stores of a one-host conversion; a host fetches only its tensors' byte ranges (plus
headers) from files it needs little of; a failed host resumes alone; two processes, each with
its own host's output, run the model as one full output does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub.utils import _http

import pipeline.hub as hub_module
import pipeline.scheduler as scheduler_module
from loader import LoaderError, open_device
from loader.cli import main as manifest_main
from pipeline.cli import main
from pipeline.convert import convert
from pipeline.errors import InputError
from pipeline.hosts import host_selection
from pipeline.safetensors_io import read_header
from pipeline.source import LocalSource
from tests.conftest import ROOT
from tests.test_run import close, free_port, run

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer, Repo, use_hub  # noqa: E402

REPO = "XiaomiMiMo/MiMo-tiny"
DEVICES = 4
EXPERT_FILES = ("_linear_fc1.safetensors", "_linear_fc2.safetensors")


@pytest.fixture
def hub(tiny_ckpt, tmp_path, monkeypatch):
    server = HubServer({REPO: Repo.from_folder(tiny_ckpt)})
    use_hub(monkeypatch, server.url, tmp_path / "hf")
    monkeypatch.setattr(scheduler_module, "COMMIT_SECONDS", 0.02)
    yield server
    server.stop()
    _http.close_session()


@pytest.fixture(scope="module")
def full(tiny_ckpt, tmp_path_factory) -> Path:
    """The reference: one host holding all 4 devices, from the folder."""
    out = tmp_path_factory.mktemp("full") / "out"
    convert(LocalSource(tiny_ckpt), out, DEVICES, progress=False)
    return out


def shard(*args: str):
    return CliRunner().invoke(main, [*map(str, args), "--quiet"], catch_exceptions=False)


def arrays(out: Path, stores: set[str] | None = None) -> list[dict]:
    """``mimo-manifest list --json`` records (checksums included), of ``stores`` if given.

    The transform's name is kept, not its parameters: a one-read unit cut to a host's ranks
    (``attn/o``: ``source_cols``) records only the pieces that host wrote.
    """
    r = CliRunner().invoke(manifest_main, ["list", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return [
        {**a, "transform": a["transform"]["name"]}
        for a in json.loads(r.stdout)
        if stores is None or a["store"] in stores
    ]


def stores_of(devices: list[int]) -> set[str]:
    return {"shared", *(f"device-{d:03d}" for d in devices)}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def tensor_spans(ckpt: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """file -> tensor -> absolute byte range, from the checkpoint's headers."""
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        h = read_header(f)
        out[f.name] = {n: (e.begin, e.end) for n, e in h.tensors.items()}
    return out


def needed(out: Path, spans: dict) -> dict[str, set[str]]:
    """file -> the tensors the output's arrays were made from."""
    names = {s for a in arrays(out) for s in a["sources"]}
    return {f: {t for t in ts if t in names} for f, ts in spans.items()}


def outside(ranges: list[tuple[str, int, int]], ckpt: Path, allowed: dict[str, set[str]]):
    """Bytes sent that lie in no allowed tensor of their file and not in its header."""
    spans = tensor_spans(ckpt)
    stray = 0
    for file, start, end in ranges:
        keep = [spans[file][t] for t in allowed.get(file, ())]
        data_start = min(a for a, _ in spans[file].values())
        keep.append((0, data_start))
        covered = sum(max(0, min(end, b) - max(start, a)) for a, b in keep)
        stray += (end - start) - covered
    return stray


# ------------------------------------------------------------------------------ selection
def test_host_selection_from_options_and_environment():
    assert host_selection(64, 2, 1, None, env={}) == (2, 1, tuple(range(32, 64)))
    assert host_selection(8, None, None, None, env={"NODE_RANK": "1", "NNODES": "2"}) == (
        2,
        1,
        (4, 5, 6, 7),
    )
    env = {"SLURM_NODEID": "0", "SLURM_NNODES": "4"}
    assert host_selection(8, None, None, None, env=env) == (4, 0, (0, 1))
    assert host_selection(8, 2, 0, "0,2,4,6", env={}) == (2, 0, (0, 2, 4, 6))
    assert host_selection(8, None, None, None, env={}) == (1, 0, None)
    bad = [
        ((8, 2, 1, None, {"GROUP_RANK": "0", "GROUP_WORLD_SIZE": "2"}), "--host-rank 1 differs"),
        ((8, None, None, None, {"NODE_RANK": "1", "SLURM_NODEID": "0"}), "disagrees"),
        ((8, 3, 0, None, {}), "--hosts 3 does not divide --devices 8"),
        ((8, 2, 2, None, {}), "--host-rank 2 is outside 0..1"),
        ((8, 2, 0, "6-9", {}), "--host-devices '6-9': 8 and 1 more are out of range"),
        ((8, None, None, None, {"NNODES": "two"}), "NNODES='two': not an integer"),
    ]
    for (*args, env), message in bad:
        with pytest.raises(InputError, match=re.escape(message)):
            host_selection(*args, env=env)


def test_mismatch_with_the_environment_is_a_one_line_error(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "0")
    r = shard(tiny_ckpt, tmp_path / "o", "--devices", DEVICES, "--hosts", "4")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "mimo-shard: error: --hosts 4 differs from the launcher's "
        "GROUP_WORLD_SIZE/NNODES/SLURM_NNODES (2)"
    ]


# ------------------------------------------------------------------------------ local source
def test_hosts_from_a_folder_equal_the_one_host_stores(tiny_ckpt, full, tmp_path):
    """Each host writes the shared store and its devices' stores, nothing else, with the
    checksums of the one-host output; together they are the whole output."""
    union = []
    for rank, held in ((0, [0, 1]), (1, [2, 3])):
        out = tmp_path / f"host{rank}"
        r = shard(tiny_ckpt, out, "--devices", DEVICES, "--hosts", 2, "--host-rank", rank)
        assert r.exit_code == 0, r.output
        assert sorted(p.name for p in out.glob("*.zarr")) == sorted(
            f"{s}.zarr" for s in stores_of(held)
        )
        assert arrays(out) == arrays(full, stores_of(held))
        m = manifest(out)
        assert m["hosts"]["count"] == 2 and m["hosts"]["devices"] == held
        assert sorted(m["stores"]) == sorted(stores_of(held))
        assert m["options"]["hosts"] == {"count": 2, "rank": rank, "devices": held}
        union += [a for a in arrays(out) if a["store"] != "shared"]
        # the held stores verify; the manifest says they are this host's part
        v = CliRunner().invoke(manifest_main, ["verify", str(out), "-q"])
        assert v.exit_code == 0, v.output
        assert f"verified {len(arrays(out))} arrays" in v.output
        part = f"this host's part: the shared store and devices {held[0]}-{held[1]} of 4"
        assert part in v.output
    assert sorted(union, key=lambda a: (a["store"], a["path"])) == sorted(
        (a for a in arrays(full) if a["store"] != "shared"), key=lambda a: (a["store"], a["path"])
    )
    # both parts agree on the layout identity the runtime compares
    assert (
        manifest(tmp_path / "host0")["hosts"]["layout"]
        == manifest(tmp_path / "host1")["hosts"]["layout"]
    )


def test_a_host_reads_only_its_tensors_from_a_folder(tiny_ckpt, tmp_path, monkeypatch):
    """The reader's reads, recorded per tensor, cover only the held stores' sources."""
    import pipeline.source as source_module

    read: set[str] = set()
    original = source_module.Reader.raw

    def spy(self, name, *args, **kwargs):
        read.add(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(source_module.Reader, "raw", spy)
    out = tmp_path / "h"
    r = shard(tiny_ckpt, out, "--devices", DEVICES, "--host-devices", "3")
    assert r.exit_code == 0, r.output
    sources = {s for a in arrays(out) for s in a["sources"]}
    assert read == sources
    expert = {t for t in read if ".experts." in t}
    experts_held = {int(t.split(".experts.")[1].split(".")[0]) for t in expert}
    assert experts_held == {12, 13, 14, 15}  # device 3's block of 16 experts


def test_a_rank_held_elsewhere_is_refused_by_name(tiny_ckpt, tmp_path):
    out = tmp_path / "h1"
    r = shard(tiny_ckpt, out, "--devices", DEVICES, "--hosts", 2, "--host-rank", 1)
    assert r.exit_code == 0, r.output
    dev = open_device(out, 2)
    assert dev.rank == 2 and "layers/1/experts/gate_up" in dev
    with pytest.raises(
        LoaderError,
        match="device 1 is held by another host: this output "
        r"\(host 1 of 2\) holds devices 2-3",
    ):
        open_device(out, 1)
    code, text = run(out, "--device-rank", 0, "--world-size", 4, "--input-ids", "1,2")
    assert code == 2 and "device 0 is held by another host" in text
    r = CliRunner().invoke(manifest_main, ["list", str(out), "--device-rank", "0"])
    assert r.exit_code == 2 and "device 0 is held by another host" in r.output
    r = CliRunner().invoke(manifest_main, ["show", str(out)])
    assert r.exit_code == 0 and "1 of 2: holds the shared store and devices 2-3 of 4" in r.output


def test_dry_run_prints_each_host(tiny_ckpt, full):
    r = shard(tiny_ckpt, "--dry-run", "--devices", DEVICES, "--hosts", 2, "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    hosts = plan["hosts"]
    assert [h["devices"] for h in hosts] == [[0, 1], [2, 3]]
    m = manifest(full)
    per_store = {s: v["bytes"] for s, v in m["stores"].items()}
    for h in hosts:
        assert h["write_bytes"] == sum(per_store[s] for s in stores_of(h["devices"]))
        assert h["disk_bytes"] > h["write_bytes"]
        assert h["read_bytes"] < plan["source_bytes"]  # half the experts each
    text = shard(tiny_ckpt, "--dry-run", "--devices", DEVICES, "--hosts", 2)
    assert "source read" in text.output and "disk needed" in text.output


# ------------------------------------------------------------------------------ Hub source
def test_each_host_fetches_only_its_byte_ranges_from_the_hub(hub, tiny_ckpt, full, tmp_path):
    total = sum(p.stat().st_size for p in tiny_ckpt.glob("*.safetensors"))
    sent, experts = {}, {}
    expert_total = sum(
        p.stat().st_size for p in tiny_ckpt.glob("*.safetensors") if p.name.endswith(EXPERT_FILES)
    )
    for rank, held in ((0, [0, 1]), (1, [2, 3])):
        hub.clear_log()
        out = tmp_path / f"host{rank}"
        r = shard(
            REPO,
            out,
            "--devices",
            DEVICES,
            "--hosts",
            2,
            "--host-rank",
            rank,
            "--cache-dir",
            tmp_path / f"cache{rank}",
        )  # each host its own disk
        assert r.exit_code == 0, r.output
        assert arrays(out) == arrays(full, stores_of(held))
        log = hub.byte_ranges()
        sent[rank] = hub.bytes_sent()
        experts[rank] = sum(e - a for f, a, e in log if f.endswith(EXPERT_FILES))
        # half the devices: half the expert bytes (plus the expert files' headers)
        assert experts[rank] == pytest.approx(expert_total / 2, rel=0.02)
        # expert files: never downloaded whole, only this host's experts' ranges and headers
        expert_hits = [h for h in hub.cdn_gets() if h.file.endswith(EXPERT_FILES)]
        assert expert_hits and not any(h.whole for h in expert_hits)
        assert outside(log, tiny_ckpt, needed(out, tensor_spans(tiny_ckpt))) == 0
        assert sent[rank] < total
        # the range-fetched tensors carry their sha256, equal to the checkpoint's bytes
        shas = manifest(out)["source"]["tensor_sha256"]
        assert shas and all(".experts." in t for t in shas)
        spans = tensor_spans(tiny_ckpt)
        for t, sha in list(shas.items())[:8]:
            f = next(f for f, ts in spans.items() if t in ts)
            a, b = spans[f][t]
            assert hashlib.sha256((tiny_ckpt / f).read_bytes()[a:b]).hexdigest() == sha
    print(
        f"checkpoint {total} bytes (expert files {expert_total}); fetched: host 0 {sent[0]} "
        f"({experts[0]} of expert files), host 1 {sent[1]} ({experts[1]} of expert files)"
    )


def test_an_expert_subset_from_the_hub_fetches_that_share(hub, tiny_ckpt, tmp_path):
    spans = tensor_spans(tiny_ckpt)
    expert_bytes = {
        f: sum(b - a for a, b in ts.values()) for f, ts in spans.items() if f.endswith(EXPERT_FILES)
    }
    out = tmp_path / "sub"
    r = shard(REPO, out, "--devices", 2, "--experts", "0-1")
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref"
    convert(LocalSource(tiny_ckpt), ref, 2, experts="0-1", progress=False)
    assert arrays(out) == arrays(ref)
    fetched = sum(
        end - start
        for f, start, end in hub.byte_ranges()
        if f in expert_bytes and start >= min(a for a, _ in spans[f].values())
    )
    share = fetched / sum(expert_bytes.values())
    print(f"--experts 0-1 of 16: fetched {fetched} of {sum(expert_bytes.values())} expert bytes")
    assert share == pytest.approx(2 / 16, rel=0.01)


def test_a_failed_host_resumes_alone(hub, tiny_ckpt, full, tmp_path, monkeypatch):
    """Host 1's source fails mid-run; its rerun resumes, fetching no range twice."""
    real = hub_module.HubSource._read_range
    calls = {"n": 0}

    def flaky(self, file, start, length):
        if start > 8 and file.endswith(EXPERT_FILES[0]) and "3_" in file:  # tensor data
            raise InputError(f"{file}: the Hub could not be reached (simulated)")
        calls["n"] += 1
        return real(self, file, start, length)

    monkeypatch.setattr(hub_module.HubSource, "_read_range", flaky)
    out = tmp_path / "host1"
    args = (REPO, out, "--devices", DEVICES, "--hosts", 2, "--host-rank", 1)
    r = shard(*args)
    assert r.exit_code == 2 and "simulated" in r.stderr
    assert not (out / "manifest.json").exists()
    first = set(hub.byte_ranges())
    monkeypatch.setattr(hub_module.HubSource, "_read_range", real)
    hub.clear_log()
    r = shard(*args)
    assert r.exit_code == 0, r.output
    assert "resumed" in r.output and "(0 resumed)" not in r.output
    data = [x for x in hub.byte_ranges() if x[1] > 8]
    assert data and not set(data) & {x for x in first if x[1] > 8 and x[0].endswith(EXPERT_FILES)}
    assert arrays(out) == arrays(full, stores_of([2, 3]))


# ------------------------------------------------------------------------------ runtime
def test_two_processes_each_with_its_own_host_output_equal_one_full_output(tiny_ckpt, tmp_path):
    full2 = tmp_path / "full2"
    convert(LocalSource(tiny_ckpt), full2, 2, progress=False)
    parts = {}
    for rank in (0, 1):
        parts[rank] = tmp_path / f"part{rank}"
        r = shard(tiny_ckpt, parts[rank], "--devices", 2, "--hosts", 2, "--host-rank", rank)
        assert r.exit_code == 0, r.output
    # two "hosts": each process opens its own output (rank r holds device r)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    base = ["--input-ids", "5,17,250,3,99", "--max-new-tokens", "3", "--json", "--backend", "cpu"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.cli",
                str(parts[r]),
                *base,
                "--device-rank",
                str(r),
                "--world-size",
                "2",
                "--logits-out",
                str(tmp_path / f"logits-{r}.npy"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    code, text = run(full2, *base, "--all-ranks", "--logits-out", tmp_path / "all.npy")
    assert code == 0, text
    close(np.load(tmp_path / "logits-0.npy"), np.load(tmp_path / "all.npy"))


def test_hub_headers_are_read_on_a_bounded_pool(hub, tmp_path, monkeypatch):
    """A dry run from the Hub reads the headers several at a time, at most HEADER_THREADS."""
    import threading
    import time

    real = hub_module.HubSource.header
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "calls": 0}

    def counted(self, file):
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.02)  # long enough for the pool's other threads to start theirs
            return real(self, file)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(hub_module.HubSource, "header", counted)
    r = shard(REPO, "--dry-run", "--devices", DEVICES, "--hosts", 2, "--json")
    assert r.exit_code == 0, r.output
    repo = hub.repos[REPO]
    assert state["calls"] == sum(map(repo.is_lfs, repo.files))  # every weight file, once
    assert 1 < state["most"] <= hub_module.HEADER_THREADS
    hosts = json.loads(r.stdout)["hosts"]
    # a Hub source: what each host downloads (expert files by ranges), below the checkpoint
    whole = sum(len(d) for d in repo.files.values())
    assert all(h["download_bytes"] < whole for h in hosts)
