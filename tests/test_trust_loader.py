"""The read side trusts nothing it reads: manifests, tables and folders that are not what they
claim give a one-line error naming the file, record or option (exit 2), never a traceback, and
never a read outside the output."""

from __future__ import annotations

import copy as copylib
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from loader import LoaderError, open_device
from loader.cli import main
from loader.manifest import read_arrays, read_manifest
from loader.verify import crc32_file
from pipeline.convert import convert
from pipeline.source import LocalSource
from runtime.cli import main as run_main


def run(*args, cli=main) -> tuple[int, str]:
    """Exit code and output (stdout + stderr) of a command; an uncaught exception fails."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code, res.output


def one_line_error(code: int, text: str, *expected: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1, text
    for e in expected:
        assert e in lines[0], (e, lines[0])


@pytest.fixture(scope="module")
def small(tiny_ckpt, tmp_path_factory) -> Path:
    """tiny, two layers, for two devices (read-only: copy it before damaging it)."""
    out = tmp_path_factory.mktemp("small") / "out"
    convert(LocalSource(tiny_ckpt), out, 2, layers="0,1", progress=False)
    return out


@pytest.fixture(scope="module")
def full(tiny_mtp_ckpt, tmp_path_factory) -> Path:
    """tiny with MTP layers, every layer, two devices (read-only)."""
    out = tmp_path_factory.mktemp("full") / "out"
    convert(LocalSource(tiny_mtp_ckpt), out, 2, progress=False)
    return out


@pytest.fixture()
def out(small, tmp_path) -> Path:
    return Path(shutil.copytree(small, tmp_path / "out"))


def table_file(out: Path, store: str) -> Path:
    return out / "manifest.d" / f"{store}.json"


def write_table(out: Path, store: str, table: dict) -> None:
    """Rewrite ``store``'s array table and record its new sha256, as a forger would."""
    data = json.dumps(table, separators=(",", ":")).encode() + b"\n"
    table_file(out, store).write_bytes(data)
    mp = out / "manifest.json"
    m = json.loads(mp.read_text())
    m["stores"][store]["table_sha256"] = hashlib.sha256(data).hexdigest()
    mp.write_text(json.dumps(m))


def edit_record(out: Path, store: str, array: str, changes: dict) -> dict:
    table = json.loads(table_file(out, store).read_text())
    rec = next(r for r in table["arrays"] if r["path"] == array)
    rec.update(changes)
    write_table(out, store, table)
    return rec


def chunk_of(out: Path, store: str, path: str) -> Path:
    table = json.loads(table_file(out, store).read_text())
    rec = next(r for r in table["arrays"] if r["path"] == path)
    return out / f"{store}.zarr" / path / "/".join(["c"] + ["0"] * len(rec["shape"]))


# ---------------------------------------------------------------- 1. records that escape OUT
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("path", "../../outside/lm_head"),
        ("path", "layers/../../../outside"),
        ("path", "/etc/lm_head"),
        ("path", "layers\\0\\attn"),
        ("path", "lm_head\x00x"),
        ("path", "lm head"),
        ("store", "../device-000"),
        ("store", "shared"),  # a device table claiming a shared record
    ],
)
def test_records_escaping_out_are_refused_everywhere(out, tmp_path, field, value):
    if field == "path":  # a forged store: the escaped path is in its metadata, a chunk is there
        root = out / "device-000.zarr" / "zarr.json"
        meta = json.loads(root.read_text())
        arrays = meta["consolidated_metadata"]["metadata"]
        arrays[value] = arrays["lm_head"]
        root.write_text(json.dumps(meta))
        outside = tmp_path / "outside" / "lm_head"
        if value.startswith("../../outside"):
            shutil.copytree(out / "device-000.zarr" / "lm_head", outside)
    edit_record(out, "device-000", "lm_head", {field: value})
    m = read_manifest(out)
    with pytest.raises(LoaderError, match=r"device-000\.json: array \d+ \('device-000/"):
        read_arrays(out, m)
    with pytest.raises(LoaderError, match=field):
        open_device(out, 0)
    for cmd in ("verify", "list"):
        one_line_error(*run(cmd, out), "device-000.json", field)


def test_bytes_must_equal_shape_times_dtype(out):
    # a shrunken chunk with a manifest record forged to match it (size and crc agree)
    f = chunk_of(out, "device-001", "lm_head")
    f.write_bytes(f.read_bytes()[:64])
    edit_record(out, "device-001", "lm_head", {"bytes": 64, "checksum": crc32_file(f)})
    with pytest.raises(LoaderError, match=r"lm_head.*bytes 64 != shape"):
        open_device(out, 1, verify=True)
    one_line_error(*run("verify", out, "-q"), "device-001.json", "bytes 64 != shape")


def test_diff_says_it_compared_manifests_and_verify_compares_chunk_bytes(small, out):
    f = chunk_of(out, "device-000", "lm_head")
    data = bytearray(f.read_bytes())
    data[5] ^= 0x10
    f.write_bytes(bytes(data))
    code, text = run("diff", small, out)
    assert code == 0
    assert "identical content (manifests compared; use --verify to compare chunk bytes)" in text
    code, text = run("diff", small, out, "--verify", "-q")
    assert code == 1 and "changed  device-000/lm_head: chunk crc32:" in text
    assert text.count("changed") == 1, text
    d = json.loads(run("diff", small, out, "--verify", "--json")[1])
    assert not d["identical"] and d["compared"] == "chunks"
    assert [(x["path"], x["fields"]) for x in d["changed"]] == [("lm_head", ["chunk"])]
    code, text = run("diff", small, small, "--verify", "-q")
    assert code == 0 and "identical content (chunk bytes compared)" in text


def _edit_manifest(out: Path, fn) -> None:
    p = out / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("dir", "manifest.json: is a folder"),
        ("fifo", "manifest.json: is not a regular file"),
        ("truncated", "manifest.json: not valid JSON"),
        ("devices-str", "options.devices: expected an integer"),
        ("no-stores", "manifest.stores: missing"),
        ("store-arrays-list", "stores.shared.arrays: expected an integer"),
        ("table-escape", "stores.shared.table"),
        ("layers-outside", "options.layers"),
        ("vocab-short", "layout.vocab"),
        ("table-not-list", "not the array table"),
        ("record-no-shape", "record.shape: missing"),
    ],
)
def test_garbled_manifests_and_tables_give_one_line(out, damage, expected):
    p = out / "manifest.json"
    if damage == "dir":
        p.unlink()
        p.mkdir()
    elif damage == "fifo":
        p.unlink()
        os.mkfifo(p)
    elif damage == "truncated":
        p.write_bytes(p.read_bytes()[:100])
    elif damage == "table-not-list":
        t = json.loads(table_file(out, "shared").read_text())
        write_table(out, "shared", t | {"arrays": {"0": t["arrays"][0]}})
    elif damage == "record-no-shape":
        t = json.loads(table_file(out, "shared").read_text())
        del t["arrays"][0]["shape"]
        write_table(out, "shared", t)
    else:
        edit = {
            "devices-str": lambda m: m["options"].update(devices="2"),
            "no-stores": lambda m: m.pop("stores"),
            "store-arrays-list": lambda m: m["stores"]["shared"].update(arrays=[]),
            "table-escape": lambda m: m["stores"]["shared"].update(table="../../x.json"),
            "layers-outside": lambda m: m["options"].update(layers=[0, 99]),
            "vocab-short": lambda m: m["layout"].update(vocab=[[0, 1]]),
        }[damage]
        _edit_manifest(out, edit)
    # show reads only the manifest; list and verify read the tables too
    for cmd in (
        ("list", "verify")
        if damage.startswith(("table-", "record-"))
        else ("show", "list", "verify")
    ):
        one_line_error(*run(cmd, out), expected)
    with pytest.raises(LoaderError, match=re.escape(expected)):
        open_device(out, 0)


# mutation kinds of the fuzz test: each takes (rng, value) and returns the replacement
_JUNK = [None, True, -1, 0, 10**30, 1.5, "", "../", "x", [], [1], {}, {"a": 1}]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i))


def _mutate(rng: random.Random, doc):
    """``doc`` with one random field deleted, retyped or given a ``../``."""
    doc = copylib.deepcopy(doc)
    target = rng.choice([p for p in _paths(doc) if p])
    parent = doc
    for k in target[:-1]:
        parent = parent[k]
    key, op = target[-1], rng.choice(("delete", "retype", "escape"))
    if op == "delete":
        del parent[key]
    elif op == "escape" and isinstance(parent[key], str):
        parent[key] = "../" + parent[key]
    else:
        parent[key] = rng.choice(_JUNK)
    return doc


def test_fuzzed_manifests_and_tables_never_crash(small, tmp_path):
    out = Path(shutil.copytree(small, tmp_path / "out"))
    good_t = json.loads(table_file(out, "device-001").read_text())
    write_table(out, "device-001", good_t)
    saved = {p: p.read_bytes() for p in (out / "manifest.json", table_file(out, "device-001"))}
    good_m = json.loads((out / "manifest.json").read_text())
    rng = random.Random(1234)
    codes = set()
    for i in range(200):
        for p, data in saved.items():
            p.write_bytes(data)
        what = rng.choice(("manifest", "table", "table", "truncate"))
        if what == "manifest":
            (out / "manifest.json").write_text(json.dumps(_mutate(rng, good_m)))
        elif what == "table":
            write_table(out, "device-001", _mutate(rng, good_t))
        else:
            p = rng.choice([out / "manifest.json", table_file(out, "device-001")])
            data = p.read_bytes()
            p.write_bytes(data[: rng.randrange(len(data))])
        for args in (
            ("show", out),
            ("show", out, "--json"),
            ("list", out),
            ("list", out, "--json"),
            ("verify", out, "-q", "--device-rank", "1"),
            ("diff", small, out),
        ):
            code, text = run(*args)
            assert code in (0, 1, 2), (i, args, text)
            assert "Traceback" not in text, (i, args, text)
            codes.add(code)
        try:
            open_device(out, 1)
        except LoaderError:
            pass
    assert 2 in codes and 0 in codes  # the mutations reach both refusals and harmless fields


# ------------------------------------------------------------- 2. messages that are true
def _unusable(kind: str, ckpt: Path, tmp: Path) -> Path:
    """A folder argument that is not a complete output, of the given kind."""
    target = tmp / "target"
    if kind == "file":
        target.write_text("x")
    elif kind == "checkpoint":
        return ckpt
    elif kind == "empty":
        target.mkdir()
    elif kind == "incomplete":
        (target / ".mimo-shard").mkdir(parents=True)
    return target


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "does not exist"),
        ("file", "is a file, not a mimo-shard output"),
        ("checkpoint", "is a checkpoint, not a mimo-shard output: did you mean `mimo-shard "),
        ("empty", "not a mimo-shard output (no manifest.json"),
        ("incomplete", "the output is incomplete (a conversion is running"),
    ],
)
def test_each_unusable_folder_has_its_own_message(tiny_ckpt, tmp_path, kind, expected):
    target = _unusable(kind, tiny_ckpt, tmp_path)
    with pytest.raises(LoaderError, match="."):
        read_manifest(target)
    one_line_error(*run("show", target), expected)
    code, text = run(target, "--input-ids", "1,2", cli=run_main)
    assert code == 2 and expected in text and "Traceback" not in text
    if "incomplete" not in expected:
        assert "incomplete" not in text


# ---------------------------------------------------------------- 3. audit checks its source
def test_audit_says_when_the_source_is_another_checkpoint(full, tiny_ckpt, tiny_mtp_ckpt, tmp_path):
    code, text = run("audit", full, tiny_mtp_ckpt)
    assert code == 0 and "SOURCE DIFFERS" not in text
    code, text = run("audit", full, tiny_ckpt)  # the same model without its MTP tensors
    assert code == 1
    assert text.splitlines()[0].startswith("SOURCE DIFFERS  index sha256"), text
    assert "not the checkpoint this output was converted from" in text
    d = json.loads(run("audit", full, tiny_ckpt, "--json")[1])
    assert d["source_mismatch"]["index_sha256"]["match"] is False
    src = Path(shutil.copytree(tiny_mtp_ckpt, tmp_path / "src"))
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # the same index, another config file
    code, text = run("audit", full, src)
    assert code == 1 and "SOURCE DIFFERS  config.json sha256" in text
    assert "index sha256" not in text


def _fake_hf_cache(root: Path, repo: str, ckpt: Path, rev: str) -> None:
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(ckpt / name, snap / name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)


def test_audit_accepts_a_repo_id_from_the_local_cache(full, tiny_mtp_ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    _fake_hf_cache(cache, "org/name", tiny_mtp_ckpt, "a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code, text = run("audit", full, "org/name")
    assert code == 0 and "source tensors" in text, text
    code, text = run("audit", full, "org/name", "--revision", "a" * 40)
    assert code == 0, text
    one_line_error(*run("audit", full, "org/other"), "org/other", "local Hugging Face cache")
    one_line_error(*run("audit", full, "org/name", "--revision", "v2"), "org/name", "v2")
    one_line_error(*run("audit", full, "no-such-folder"), "no-such-folder", "not a Hub repo id")


# --------------------------------------------------------------- 4. user errors: one line
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("verify", "{out}", "--workers", "-2"), "--workers"),
        (("verify", "{out}", "-j", "0"), "--workers"),
        (("verify", "{out}", "--device-rank", "-1"), "--device-rank"),
        (("list", "{out}", "--device-rank", "7"), "--device-rank 7 is outside 0..1"),
        (("show",), "OUT"),
        (("nosuch", "{out}"), "nosuch"),
    ],
)
def test_user_errors_are_one_line_naming_the_option(small, args, expected):
    one_line_error(*run(*(a.format(out=small) for a in args)), expected)
