"""Hub sources against a local stand-in of the Hub (tests/hubserver.py): nothing leaves the machine.

A conversion from a repo id is byte-identical to one from the folder; with --delete-source-files
at most two source files sit on disk (measured); dropped connections, outages and kills resume
without downloading finished files again; every failure is a clear error naming repo, revision
and file, with no manifest; a dry run reads only the config, the index and the headers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import constants
from huggingface_hub.utils import _http

import pipeline.scheduler as scheduler_module
from loader.cli import main as manifest_main
from pipeline.cli import main
from pipeline.convert import convert
from pipeline.errors import InputError
from pipeline.hub import parse_size
from pipeline.safetensors_io import read_header
from pipeline.source import LocalSource

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer, Repo, use_hub  # noqa: E402

REPO = "XiaomiMiMo/MiMo-tiny"
SHA = Repo({}).sha
DEVICES = "2"


@pytest.fixture
def hub(tiny_ckpt, tmp_path, monkeypatch):
    """The tiny checkpoint served as REPO (refs main and v1.0), huggingface_hub pointed at it."""
    server = HubServer({REPO: Repo.from_folder(tiny_ckpt, refs={"main": SHA, "v1.0": SHA})})
    use_hub(monkeypatch, server.url, tmp_path / "hf")
    monkeypatch.setattr(scheduler_module, "COMMIT_SECONDS", 0.02)  # release files promptly
    monkeypatch.setenv("MIMO_SHARD_COMMIT_SECONDS", "0.02")  # ... in subprocesses too
    yield server
    server.stop()
    _http.close_session()


@pytest.fixture(scope="module")
def local_out(tiny_ckpt, tmp_path_factory) -> Path:
    """The reference: the same checkpoint converted from its folder."""
    out = tmp_path_factory.mktemp("local") / "out"
    convert(LocalSource(tiny_ckpt), out, int(DEVICES), progress=False)
    return out


def shard(*args: str, quiet: bool = True):
    """``mimo-shard`` in this process."""
    extra = ["--quiet"] if quiet else []
    return CliRunner().invoke(main, [*args, *extra], catch_exceptions=False)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def arrays(out: Path) -> list[dict]:
    """Every output array with its checksum, as ``mimo-manifest list --json`` reports it."""
    r = CliRunner().invoke(manifest_main, ["list", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def assert_same_output(out: Path, ref: Path) -> None:
    """Same arrays and checksums, same manifest but for the source's identity, same bytes."""
    assert arrays(out) == arrays(ref)
    identity = {"kind", "path", "repo_id", "revision", "requested_revision"}
    got, want = manifest(out), manifest(ref)
    for m in (got, want):
        del m["created"]
        m["source"] = {k: v for k, v in m["source"].items() if k not in identity}
    assert got == want

    def files(d: Path) -> list[Path]:
        return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())

    assert files(out) == files(ref)
    for rel in files(ref):
        if rel.name != "manifest.json":
            assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel


def downloads(server: HubServer, file: str | None = None) -> list:
    """CDN GETs that download a file (whole, or resumed from a byte on), not header reads."""
    return [h for h in server.cdn_gets(file) if h.range is None or h.range.endswith("-")]


def whole(server: HubServer) -> list[str]:
    return [h.file for h in server.cdn_gets() if h.whole]


def lfs_files(server: HubServer) -> dict[str, int]:
    repo = server.repos[REPO]
    return {n: len(d) for n, d in repo.files.items() if repo.is_lfs(n)}


def cache_blobs(home: Path) -> Path:
    return home / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"


def resumed(output: str) -> int:
    m = re.search(r"\((\d+) resumed\)", output)
    assert m, output
    return int(m.group(1))


# ------------------------------------------------------------------------------ conversion
def test_hub_conversion_equals_local_and_uses_the_cache(hub, local_out, tmp_path, monkeypatch):
    out = tmp_path / "out"
    r = shard(REPO, str(out), "--devices", DEVICES, quiet=False)
    assert r.exit_code == 0, r.output
    assert_same_output(out, local_out)
    src = manifest(out)["source"]
    assert (src["kind"], src["repo_id"], src["revision"]) == ("hub", REPO, SHA)
    assert src["requested_revision"] is None
    assert src["files"] == manifest(local_out)["source"]["files"]
    # downloads and conversion have their own progress bars
    assert re.search(r"download: 100%.*B/s", r.stderr) and "convert: 100%" in r.stderr
    # the revision was resolved once; every file request names the commit, never the branch
    resolves = [h for h in hub.hits if h.kind == "resolve"]
    assert resolves and all(f"/resolve/{SHA}/" in h.path for h in resolves)
    assert sum(h.kind == "api" for h in hub.hits) == 1
    # each safetensors file was downloaded exactly once, whole
    assert sorted(whole(hub)) == sorted(lfs_files(hub))
    assert all(h.whole for h in downloads(hub))

    # another revision name for the same commit: everything comes from the cache
    hub.clear_log()
    r = shard(REPO, str(tmp_path / "tag"), "--devices", DEVICES, "--revision", "v1.0")
    assert r.exit_code == 0, r.output
    assert_same_output(tmp_path / "tag", local_out)
    src = manifest(tmp_path / "tag")["source"]
    assert (src["revision"], src["requested_revision"]) == (SHA, "v1.0")
    assert [h.kind for h in hub.hits] == ["api"]  # only the revision was asked

    # HF_HUB_OFFLINE: the cache alone, not a single request
    hub.clear_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    r = shard(REPO, str(tmp_path / "offline"), "--devices", DEVICES)
    assert r.exit_code == 0, r.output
    assert_same_output(tmp_path / "offline", local_out)
    assert hub.hits == []


class DiskWatch(threading.Thread):
    """Polls the cache's blobs folder: the most safetensors bytes and files seen at once."""

    def __init__(self, blobs: Path, etags: set[str]) -> None:
        super().__init__(daemon=True)
        self.blobs, self.etags = blobs, etags
        self.peak_bytes = self.peak_files = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total, seen = 0, set()
            try:
                entries = list(os.scandir(self.blobs))
            except FileNotFoundError:
                entries = []
            for e in entries:
                etag = e.name.split(".")[
                    0
                ]  # a blob, or "<etag>.<id>.incomplete" while it downloads
                if etag in self.etags:
                    try:
                        total += e.stat().st_size
                    except FileNotFoundError:
                        continue
                    seen.add(etag)
            self.peak_bytes = max(self.peak_bytes, total)
            self.peak_files = max(self.peak_files, len(seen))
            time.sleep(0.001)


@pytest.mark.parametrize("max_disk", [None, "2.5MB", "1B"])
def test_delete_source_files_bounds_the_source_bytes_on_disk(hub, local_out, tmp_path, max_disk):
    sizes = lfs_files(hub)
    hub.rate = 25e6  # bytes/s: downloads take long enough to be seen
    watch = DiskWatch(cache_blobs(tmp_path / "hf"), {hub.repos[REPO].sha256[n] for n in sizes})
    watch.start()
    extra = ["--max-source-disk", max_disk] if max_disk else []
    try:
        r = shard(
            REPO, str(tmp_path / "out"), "--devices", DEVICES, "--delete-source-files", *extra
        )
    finally:
        watch.done.set()
        watch.join()
    assert r.exit_code == 0, r.output
    assert_same_output(tmp_path / "out", local_out)
    largest = sorted(sizes.values(), reverse=True)
    if max_disk is None:  # one file converting while the next downloads, never more
        assert watch.peak_files == 2
        assert watch.peak_bytes <= largest[0] + largest[1]
    elif max_disk == "2.5MB":
        assert 2 <= watch.peak_files and watch.peak_bytes <= 2_500_000
    else:  # every file is larger than the bound: each is downloaded alone, no deadlock
        assert watch.peak_files == 1 and watch.peak_bytes <= largest[0]
    print(f"max_disk={max_disk}: peak {watch.peak_bytes} bytes in {watch.peak_files} files")
    assert sorted(whole(hub)) == sorted(sizes)  # each downloaded once
    left = [
        p for p in cache_blobs(tmp_path / "hf").iterdir() if p.name.split(".")[0] in watch.etags
    ]
    assert left == []  # every safetensors file was removed once converted


# ------------------------------------------------------------------ interruptions, resume
def test_a_connection_dropped_mid_file_is_retried_by_the_client(hub, local_out, tmp_path):
    file = "model_3.safetensors"
    size = lfs_files(hub)[file]
    half = size // 2
    hub.drop_once[file] = half
    r = shard(REPO, str(tmp_path / "out"), "--devices", DEVICES)
    assert r.exit_code == 0, r.output  # the client's retry fetched the file
    assert_same_output(tmp_path / "out", local_out)
    first, retry = downloads(hub, file)
    assert (first.start, first.sent, first.dropped) == (0, half, True)
    # huggingface_hub resumes from its last whole 10 MB chunk: byte 0 for a file this small
    assert retry.start == constants.DOWNLOAD_CHUNK_SIZE * (half // constants.DOWNLOAD_CHUNK_SIZE)
    assert retry.start + retry.sent == size and not retry.dropped
    others = [h for h in downloads(hub) if h.file != file]
    assert all(h.whole for h in others) and len(others) == len(lfs_files(hub)) - 1


def test_an_outage_mid_file_fails_clearly_and_the_rerun_resumes(hub, local_out, tmp_path):
    file = "model_2_linear_fc1.safetensors"
    hub.drop_once[file] = lfs_files(hub)[file] // 2
    hub.down_after_drop = True  # the client's retries all fail
    out = tmp_path / "out"
    r = shard(REPO, str(out), "--devices", DEVICES)
    assert r.exit_code == 2, r.output
    msg = r.stderr
    assert msg.startswith("mimo-shard: error: ") and f"{REPO}@main ({SHA[:12]}): {file}" in msg
    assert "download failed after retries" in msg and "rerun the same command" in msg
    assert not (out / "manifest.json").exists()
    first = set(whole(hub))
    assert file not in first and first  # files before it were downloaded

    hub.outage.clear()
    hub.clear_log()
    r = shard(REPO, str(out), "--devices", DEVICES)
    assert r.exit_code == 0, r.output
    assert resumed(r.output) > 0  # units converted before the outage were not redone
    assert_same_output(out, local_out)
    second = whole(hub)
    assert file in second and not first & set(second)  # finished files: not downloaded again
    assert sorted(first | set(second)) == sorted(lfs_files(hub))
    assert not list(cache_blobs(tmp_path / "hf").glob("*.incomplete"))


def test_killed_mid_download_then_rerun(hub, local_out, tmp_path):
    """SIGKILL while a file downloads (with --delete-source-files): the rerun completes."""
    file = "model_3.safetensors"
    hit = threading.Event()
    hub.watch[file] = (lfs_files(hub)[file] // 2, hit)
    hub.rate = 10e6
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", REPO, str(out), "--devices", DEVICES, "--quiet"]
    p = subprocess.Popen([*cmd, "--delete-source-files"], stderr=subprocess.PIPE, text=True)
    try:
        assert hit.wait(60), "the download never reached the middle of the file"
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert not (out / "manifest.json").exists()
    first = set(whole(hub))
    assert file not in first
    partial = list(cache_blobs(tmp_path / "hf").glob("*.incomplete"))
    assert partial  # what the killed download left

    hub.rate = None
    hub.clear_log()
    p = subprocess.run([*cmd, "--delete-source-files"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert resumed(p.stdout) > 0
    assert_same_output(out, local_out)
    second = set(whole(hub))
    assert file in second and not first & second
    assert not any(p.exists() for p in partial)  # removed before downloading the file again
    left = [p.name for p in cache_blobs(tmp_path / "hf").iterdir()]
    assert not [n for n in left if n.split(".")[0] in hub.repos[REPO].sha256.values()]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown-repo", ["nobody/nothing@main: repository not found"]),
        ("unknown-revision", [f"{REPO}@nope: revision 'nope' not found"]),
        ("private", [f"{REPO}@main: repository not found", "HF_TOKEN"]),
        ("gated", [f"{REPO}@main ({SHA[:12]}): config.json: access denied", "gated"]),
        ("server-error", [f"{REPO}@main: the Hub answered HTTP 500"]),
        ("missing-file", [f"({SHA[:12]}): model_4.safetensors: file not found in the repo"]),
        ("offline", [f"{REPO}@main: not in the local cache, and HF_HUB_OFFLINE is set"]),
    ],
)
def test_hub_failures_are_clear_errors(hub, tmp_path, monkeypatch, case, expected):
    repo = hub.repos[REPO]
    source, extra = REPO, []
    if case == "unknown-repo":
        source = "nobody/nothing"
    elif case == "unknown-revision":
        extra = ["--revision", "nope"]
    elif case in ("private", "gated"):
        repo.mode = case
    elif case == "server-error":
        repo.mode = "error"
    elif case == "missing-file":
        del repo.files["model_4.safetensors"]
    elif case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    r = shard(source, str(out), "--devices", DEVICES, *extra)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("mimo-shard: error: ")
    for text in expected:
        assert text in r.stderr, r.stderr
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.zarr"))


@pytest.mark.parametrize("corruption", ["content", "size"])
def test_a_file_that_disagrees_with_the_metadata_is_refused(hub, local_out, tmp_path, corruption):
    file = "model_2.safetensors"
    hub.corrupt[file] = corruption
    out = tmp_path / "out"
    r = shard(REPO, str(out), "--devices", DEVICES)
    assert r.exit_code == 2, r.output
    assert f"{REPO}@main ({SHA[:12]}): {file}: " in r.stderr
    if corruption == "content":
        sha = hub.repos[REPO].sha256[file]
        assert "sha256 of the downloaded file is " in r.stderr and sha in r.stderr
    else:
        assert "disagrees with the Hub's metadata" in r.stderr  # refused at its header
    assert not (out / "manifest.json").exists()
    assert not list(cache_blobs(tmp_path / "hf").glob(f"{hub.repos[REPO].sha256[file]}*"))
    if corruption == "content":  # the bad copy was not kept: once the Hub serves the right
        hub.corrupt.clear()  # bytes, the rerun downloads it again and completes
        r = shard(REPO, str(out), "--devices", DEVICES)
        assert r.exit_code == 0, r.output
        assert_same_output(out, local_out)
        assert whole(hub).count(file) == 2


def test_dry_run_reads_only_config_index_and_headers(hub, tiny_ckpt, tmp_path):
    r = shard(REPO, "--devices", DEVICES, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    origin = json.loads(r.stdout)["origin"]
    assert origin == {"kind": "hub", "repo_id": REPO, "revision": SHA, "requested_revision": None}
    got = [h for h in hub.hits if h.method == "GET" and h.kind != "api"]
    data_start = {f: read_header(tiny_ckpt / f).data_start for f in lfs_files(hub)}
    for h in got:
        if h.kind == "resolve" and not hub.repos[REPO].is_lfs(h.file):
            assert h.file in ("config.json", "model.safetensors.index.json")
        else:  # a ranged read inside the header (resolve redirects it to the CDN)
            assert h.range is not None and (h.kind == "resolve" or h.end <= data_start[h.file]), h
    assert {h.file for h in got if h.kind == "cdn"} == set(data_start)
    blobs = cache_blobs(tmp_path / "hf")
    assert not [p for p in blobs.iterdir() if p.name in hub.repos[REPO].sha256.values()]


@pytest.mark.parametrize(
    "text, n",
    [("20GB", 20 * 10**9), ("1.5T", 1.5e12), ("500MiB", 500 << 20), ("1e10", 10**10), ("7", 7)],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["lots", "20 XB", "0", "-1GB", ""])
def test_bad_max_source_disk_names_the_option(text):
    with pytest.raises(InputError, match="--max-source-disk"):
        parse_size(text)


def test_bad_max_source_disk_on_the_command_line(hub, tmp_path):
    r = shard(REPO, str(tmp_path / "out"), "--devices", DEVICES, "--max-source-disk", "lots")
    assert r.exit_code == 2 and "--max-source-disk 'lots'" in r.stderr
    assert hub.hits == []  # refused before asking the Hub anything
