"""A checkpoint is untrusted input: hostile files are refused with one line, never followed.

Covers what a source folder may hold (regular files inside it, or a Hugging Face cache
snapshot's blobs), files changing during or between runs, safetensors headers at least as strict
as the safetensors library, and inputs that would hang or exhaust memory (FIFOs, devices,
symlink loops, deep or non-UTF-8 JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loader.manifest import read_arrays
from pipeline import convert as convert_module
from pipeline.cli import main
from pipeline.convert import convert, make_plan, needed_tensors
from pipeline.errors import InputError
from pipeline.safetensors_io import (
    MAX_HEADER,
    MAX_RANK,
    header_length,
    open_regular,
    parse_header,
    read_header,
)
from pipeline.source import INDEX, LocalSource, Reader, open_checked

JOURNAL = Path(".mimo-shard") / "journal.jsonl"


@pytest.fixture()
def src(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "src"))


def refused(src: Path, out: Path, *expected: str) -> str:
    """mimo-shard on ``src`` exits 2 with one line holding ``expected``, and writes no manifest."""
    res = CliRunner().invoke(main, [str(src), str(out), "--devices", "2", "--quiet"])
    text = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, text, res.exception)
    assert len(text.splitlines()) == 1, text
    for e in expected:
        assert e in text, (e, text)
    assert not (out / "manifest.json").exists()
    return text


def negate_in_place(path: Path) -> None:
    """Flip the sign of every value of every tensor in ``path``: same size, same inode."""
    h = read_header(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for e in h.tensors.values():
            itemsize = {"F8_E4M3": 1, "BF16": 2, "F32": 4}[e.dtype]
            data = np.frombuffer(os.pread(fd, e.nbytes, e.begin), np.uint8).copy()
            data.reshape(-1, itemsize)[:, -1] ^= 0x80  # little endian: the sign bit is last
            os.pwrite(fd, data.tobytes(), e.begin)
    finally:
        os.close(fd)


def checksums(out: Path) -> dict[tuple[str, str], str]:
    m = json.loads((out / "manifest.json").read_text())
    return {(a["store"], a["path"]): a["checksum"] for a in read_arrays(out, m)}


def checked_tiny(src: Path):
    source = LocalSource(src)
    plan, _ = make_plan(source, 2)
    return open_checked(source, needed_tensors(plan), plan.inventory)


def first_tensor_of(checked, file: str) -> str:
    return next(n for n, f in checked.weight_map.items() if f == file)


# ----------------------------------------------------------------- what SOURCE may point at
def test_small_file_symlinked_outside_is_refused_not_copied(src, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root:hash:0:0")
    (src / "special_tokens_map.json").symlink_to(secret)
    out = tmp_path / "out"
    refused(src, out, "special_tokens_map.json", "outside the source folder")
    assert not (out / "special_tokens_map.json").exists()


def hf_cache(ckpt: Path, root: Path) -> Path:
    """``ckpt`` laid out as a Hugging Face cache repo; returns its snapshot folder."""
    repo = root / "models--XiaomiMiMo--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("ab" * 20)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(ckpt.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    return snap


def test_hf_cache_snapshot_is_accepted(tiny_ckpt, tmp_path):
    snap = hf_cache(tiny_ckpt, tmp_path / "cache")
    convert(LocalSource(snap), tmp_path / "from-cache", 2, progress=False)
    convert(LocalSource(tiny_ckpt), tmp_path / "direct", 2, progress=False)
    assert checksums(tmp_path / "from-cache") == checksums(tmp_path / "direct")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # small files are symlinks too
        assert (tmp_path / "from-cache" / name).read_bytes() == (tiny_ckpt / name).read_bytes()


def test_hf_cache_snapshot_symlink_leaving_blobs_is_refused(tiny_ckpt, tmp_path):
    snap = hf_cache(tiny_ckpt, tmp_path / "cache")
    secret = tmp_path / "secret"
    secret.write_text("{}")
    (snap / "generation_config.json").symlink_to(secret)
    refused(snap, tmp_path / "out", "generation_config.json", "outside the source folder")


def test_blobs_folder_outside_a_cache_layout_is_not_trusted(tiny_ckpt, tmp_path):
    # same shape, but not under models--*/snapshots/: the blobs are outside the source folder
    snap = hf_cache(tiny_ckpt, tmp_path / "cache")
    plain = snap.parent.with_name("not-snapshots")
    snap.parent.rename(plain)
    assert (plain / snap.name / "config.json").is_file()  # the links still resolve
    refused(plain / snap.name, tmp_path / "out", "outside the source folder")


# ------------------------------------------------------------------ files changing under us
def test_reader_refuses_a_file_touched_after_its_header_was_read(src):
    checked = checked_tiny(src)
    f = src / "model_2.safetensors"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reader = Reader(checked)
    try:
        with pytest.raises(InputError, match="model_2.safetensors: changed since its header"):
            reader.raw(first_tensor_of(checked, "model_2.safetensors"))
    finally:
        reader.close()


def test_reader_refuses_a_file_replaced_with_a_longer_header(src):
    checked = checked_tiny(src)
    f = src / "model_3.safetensors"
    tensors = load_file(f)
    new = src / "new.safetensors"
    save_file(tensors, new, metadata={"format": "pt", "pad": "x" * 64})
    assert read_header(new).data_start > checked.headers["model_3.safetensors"].data_start
    os.replace(new, f)
    reader = Reader(checked)
    try:
        with pytest.raises(InputError, match="model_3.safetensors: changed since its header"):
            reader.raw(first_tensor_of(checked, "model_3.safetensors"))
    finally:
        reader.close()


def test_reader_refuses_a_file_rewritten_while_open(src):
    checked = checked_tiny(src)
    file = "model_embedding.safetensors"
    name = first_tensor_of(checked, file)
    reader = Reader(checked)
    try:
        first = reader.raw(name, 0, 1).copy()  # opens the file
        negate_in_place(src / file)
        with pytest.raises(InputError, match=f"{file}: changed since its header"):
            reader.raw(name, 0, 1)
        assert first.tobytes() != b""
    finally:
        reader.close()


def test_conversion_stops_when_a_source_file_changes_mid_run(src, tmp_path, monkeypatch):
    calls = []
    real = convert_module.run_unit

    def run_unit(ctx, unit):
        recs = real(ctx, unit)
        calls.append(unit.id)
        if len(calls) == 1:  # after the first unit, rewrite every weight file in place
            for f in sorted(src.glob("*.safetensors")):
                negate_in_place(f)
        return recs

    monkeypatch.setattr(convert_module, "run_unit", run_unit)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="changed since its header was read"):
        convert(LocalSource(src), out, 2, workers=1, progress=False)
    assert not (out / "manifest.json").exists()


def interrupted(src: Path, out: Path, monkeypatch, after: int = 3) -> None:
    """A run of ``src`` into ``out`` that fails after ``after`` units (journaled)."""
    real, calls = convert_module.run_unit, []

    def run_unit(ctx, unit):
        if len(calls) == after:
            raise RuntimeError("injected failure")
        calls.append(unit.id)
        return real(ctx, unit)

    monkeypatch.setattr(convert_module, "run_unit", run_unit)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert(LocalSource(src), out, 2, workers=1, progress=False)
    monkeypatch.setattr(convert_module, "run_unit", real)
    assert (out / JOURNAL).read_text().strip() and not (out / "manifest.json").exists()


def test_resume_of_an_unchanged_source_resumes(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted(src, out, monkeypatch)
    summary = convert(LocalSource(src), out, 2, progress=False)
    assert summary.resumed == 3 and (out / "manifest.json").is_file()


def test_resume_refuses_a_source_rewritten_in_place(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted(src, out, monkeypatch)
    f = src / "model_0.safetensors"
    size, ino = f.stat().st_size, f.stat().st_ino
    negate_in_place(f)  # same size, same inode, new contents (and mtime)
    assert (f.stat().st_size, f.stat().st_ino) == (size, ino)
    with pytest.raises(InputError, match="holds an output of another source"):
        convert(LocalSource(src), out, 2, progress=False)
    assert not (out / "manifest.json").exists()
    summary = convert(LocalSource(src), out, 2, force=True, progress=False)
    assert summary.resumed == 0 and (out / "manifest.json").is_file()


# ------------------------------------------------------------------------ header validation
def u8(begin: int, end: int, shape=None) -> dict:
    return {"dtype": "U8", "shape": [end - begin] if shape is None else shape,
            "data_offsets": [begin, end]}  # fmt: skip


def header_raw(obj) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


def deep(n: int) -> bytes:
    return b'{"a":' + b"[" * n + b"]" * n + b"}"


def test_a_well_formed_hand_built_header_parses():
    raw = header_raw({"__metadata__": {"format": "pt"}, "b": u8(4, 12), "a": u8(0, 4)})
    h = parse_header("x.safetensors", 8 + len(raw) + 12, raw)
    assert [(e.name, e.begin - h.data_start, e.end - h.data_start) for e in h.tensors.values()] == [
        ("b", 4, 12),
        ("a", 0, 4),
    ]


BAD_HEADERS = {
    "gap": ({"a": u8(0, 4), "b": u8(8, 12)}, 12, "leaves a gap"),
    "overlap": ({"a": u8(0, 8), "b": u8(4, 12)}, 12, "overlaps"),
    "trailing bytes": ({"a": u8(0, 4)}, 8, "4 trailing bytes"),
    "not starting at 0": ({"a": u8(2, 6)}, 6, "leaves a gap"),
    "utf-16 with BOM": (json.dumps({"a": u8(0, 4)}).encode("utf-16"), 4, "does not start"),
    "utf-16-le": (json.dumps({"a": u8(0, 4)}).encode("utf-16-le"), 4, "malformed"),
    "utf-8 BOM": (b"\xef\xbb\xbf" + json.dumps({"a": u8(0, 4)}).encode(), 4, "does not start"),
    "invalid utf-8": (b'{"a\xff": ' + json.dumps(u8(0, 4)).encode() + b"}", 4, "not UTF-8"),
    "shape overflowing int64": ({"a": u8(0, 0, [2**32, 2**32])}, 0, "needs 18446744073709551616"),
    "bytes beyond the file": ({"a": u8(0, 2**40, [2**20, 2**20])}, 16, "truncated"),
    "absurd rank": ({"a": u8(0, 1, [1] * (MAX_RANK + 1))}, 1, "malformed shape"),
    "absurd dim with a zero": ({"a": u8(0, 0, [0, 2**62])}, 0, "malformed shape"),
    "negative dim": ({"a": u8(0, 0, [-1])}, 0, "malformed shape"),
    "float dim": ({"a": u8(0, 4, [4.0])}, 4, "malformed shape"),
    "bool dim": ({"a": u8(0, 1, [True])}, 1, "malformed shape"),
    "unknown dtype": ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, 4, "dtype"),
    "dtype not a string": (
        {"a": {"dtype": ["U8"], "shape": [4], "data_offsets": [0, 4]}},
        4,
        "unknown dtype",
    ),
    "nested 200k deep": (deep(200_000), 0, "malformed"),
    "duplicate tensor": (b'{"a": %s, "a": %s}' % ((header_raw(u8(0, 4)),) * 2), 4, "appears twice"),
    "metadata value not a string": ({"__metadata__": {"n": 1}, "a": u8(0, 4)}, 4, "__metadata__"),
    "not an object": (b"[1, 2]", 0, "does not start"),
    "NaN": (b'{"a": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 0]}}', 0, "NaN"),
    "newline in a tensor name": ({"a\nb": u8(0, 4, [5])}, 4, "'a\\nb'"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_malformed_header_is_refused(case):
    obj, data_size, message = BAD_HEADERS[case]
    raw = header_raw(obj)
    with pytest.raises(InputError) as e:
        parse_header("x.safetensors", 8 + len(raw) + data_size, raw)
    text = str(e.value)
    assert text.startswith("x.safetensors: ") and message in text, text
    assert len(text.splitlines()) == 1 and len(text) < 400, text


@pytest.mark.parametrize(
    ("n", "size", "message"),
    [(MAX_HEADER + 1, 2**40, f"exceeds {MAX_HEADER}"), (1000, 500, "larger than the file")],
)
def test_header_length_is_bounded_before_reading(n, size, message):
    with pytest.raises(InputError, match=message):
        header_length("x.safetensors", size, struct.pack("<Q", n))


def test_malformed_header_in_a_checkpoint_fails_the_cli(src, tmp_path):
    f = src / "model_1.safetensors"
    h = read_header(f)
    raw = json.dumps({"__metadata__": h.metadata} | {
        e.name: {"dtype": e.dtype, "shape": list(e.shape),
                 "data_offsets": [e.begin - h.data_start, e.end - h.data_start]}
        for e in h.tensors.values()
    }).encode("utf-16")  # fmt: skip
    data = f.read_bytes()[h.data_start :]
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    refused(src, tmp_path / "out", "model_1.safetensors", "malformed safetensors header")


# ------------------------------------------------------ inputs that would hang or never end
def fifo(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.mkfifo(p)


def loop(p: Path) -> None:
    p.unlink(missing_ok=True)
    other = p.with_name(p.name + ".loop")
    other.symlink_to(p.name)
    p.symlink_to(other.name)


def directory(p: Path) -> None:
    p.unlink(missing_ok=True)
    p.mkdir()


def edit_index_text(src: Path, fn) -> None:
    p = src / INDEX
    p.write_bytes(fn(p.read_bytes()))


def nul_path(raw: bytes) -> bytes:
    idx = json.loads(raw)
    idx["weight_map"]["model.layers.1.input_layernorm.weight"] = "model_1.safe\0tensors"
    return json.dumps(idx).encode()


def nested(raw: bytes) -> bytes:
    return b'{"metadata": ' + b"[" * 200_000 + b"]" * 200_000 + b', "weight_map": {}}'


HOSTILE = {
    "fifo weight file": (lambda s: fifo(s / "model_final.safetensors"), "named pipe"),
    "fifo config": (lambda s: fifo(s / "config.json"), "named pipe"),
    "fifo index": (lambda s: fifo(s / INDEX), "named pipe"),
    "fifo tokenizer": (lambda s: fifo(s / "tokenizer.json"), "named pipe"),
    "directory weight file": (lambda s: directory(s / "model_2.safetensors"), "a directory"),
    "directory tokenizer": (lambda s: directory(s / "tokenizer_config.json"), "a directory"),
    "symlink loop weight file": (lambda s: loop(s / "model_2.safetensors"), "symlink loop"),
    "symlink loop tokenizer": (lambda s: loop(s / "tokenizer.json"), "symlink loop"),
    "NUL in an index path": (lambda s: edit_index_text(s, nul_path), "not a valid file name"),
    "invalid UTF-8 index": (lambda s: edit_index_text(s, lambda r: r + b"\xff"), "not UTF-8"),
    "200k-deep index": (lambda s: edit_index_text(s, nested), "nested deeper"),
}
NAMED = {  # the file each message must name
    "fifo weight file": "model_final.safetensors",
    "fifo config": "config.json",
    "directory weight file": "model_2.safetensors",
    "directory tokenizer": "tokenizer_config.json",
    "symlink loop weight file": "model_2.safetensors",
    "fifo tokenizer": "tokenizer.json",
    "symlink loop tokenizer": "tokenizer.json",
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_source_entry_is_refused_in_one_line(src, tmp_path, case):
    damage, message = HOSTILE[case]
    damage(src)
    refused(src, tmp_path / "out", NAMED.get(case, INDEX), message)


def test_character_device_is_not_opened():
    with pytest.raises(InputError, match="/dev/zero: is a character device, not a regular file"):
        open_regular("/dev/zero", "/dev/zero")


def test_character_device_in_the_source_is_refused(src, tmp_path):
    p = src / "tokenizer.json"
    p.unlink()
    try:
        os.mknod(p, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's device numbers
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    refused(src, tmp_path / "out", "tokenizer.json", "character device")
