"""Store metadata written without zarr is the metadata zarr writes, and stock zarr reads it.

Every array of a converted tiny output (bfloat16, float32, FP8 experts) is opened with
``zarr.open_array`` and checked against its manifest record; its ``zarr.json`` must equal the one
zarr-python itself writes for the same array; every parent folder is a zarr group; and the
consolidated root metadata (what ``loader.manifest.store_metadata`` reads) lists every array.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec

from loader.format import CORE_DTYPES, chunk_shape, storage_dtype
from loader.manifest import store_metadata
from pipeline.convert import convert
from pipeline.source import LocalSource

OPTIONS = {  # options, and the array dtypes the output holds
    "bf16": ({}, {"bfloat16", "float32"}),
    "f32": ({"dtype": "float32"}, {"float32"}),
    "fp8-experts": ({"expert_dtype": "float8_e4m3fn"}, {"bfloat16", "float32", "float8_e4m3fn"}),
}


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def output(request, tiny_ckpt, tmp_path_factory) -> tuple[Path, list[dict], set[str]]:
    """(output folder, every array record, the dtypes expected) of the tiny checkpoint converted
    for 2 devices."""
    out = tmp_path_factory.mktemp(request.param) / "out"
    options, dtypes = OPTIONS[request.param]
    convert(LocalSource(tiny_ckpt), out, 2, progress=False, **options)
    manifest = json.loads((out / "manifest.json").read_text())
    records = []
    for entry in manifest["stores"].values():
        records += json.loads((out / entry["table"]).read_text())["arrays"]
    return out, records, dtypes


def zarr_written(tmp: Path, record: dict) -> dict:
    """The ``zarr.json`` zarr-python writes for an array like ``record``."""
    raw = storage_dtype(record["dtype"])
    attrs = {} if record["dtype"] in CORE_DTYPES else {"logical_dtype": record["dtype"]}
    shape = tuple(record["shape"])
    zarr.create_array(
        store=tmp,
        name="a",
        shape=shape,
        chunks=chunk_shape(shape),
        dtype=raw,
        compressors=None,
        filters=None,
        serializer=BytesCodec(endian="little") if raw.itemsize > 1 else BytesCodec(),
        fill_value=0,
        attributes=attrs,
        zarr_format=3,
        overwrite=True,
    )
    return json.loads((tmp / "a" / "zarr.json").read_text())


def test_every_array_opens_with_stock_zarr(output):
    out, records, dtypes = output
    kinds = set()
    for r in records:
        z = zarr.open_array(out / f"{r['store']}.zarr" / r["path"], mode="r")
        raw = storage_dtype(r["dtype"])
        assert z.shape == tuple(r["shape"]), r["path"]
        assert z.dtype == raw, r["path"]
        assert z.attrs.get("logical_dtype", r["dtype"]) == r["dtype"], r["path"]
        assert (r["dtype"] in CORE_DTYPES) == ("logical_dtype" not in z.attrs), r["path"]
        kinds.add(r["dtype"])
        if z.size:  # the chunk file is where zarr looks for it
            first = np.asarray(z[(0,) * z.ndim])
            stored = np.fromfile(
                out / f"{r['store']}.zarr" / r["path"] / "c" / "/".join("0" * z.ndim),
                dtype=raw,
                count=1,
            )
            assert first.tobytes() == stored.tobytes(), r["path"]
    assert kinds == dtypes


def test_metadata_is_what_zarr_writes(output, tmp_path):
    out, records, _ = output
    seen = set()
    for r in records:
        key = (r["dtype"], len(r["shape"]))
        if key in seen:
            continue
        seen.add(key)
        ours = json.loads((out / f"{r['store']}.zarr" / r["path"] / "zarr.json").read_text())
        assert ours == zarr_written(tmp_path / "ref.zarr", r), r["path"]


def test_parent_folders_are_groups(output):
    out, records, _ = output
    for r in records:
        root = out / f"{r['store']}.zarr"
        folder = root
        for part in r["path"].split("/")[:-1]:
            folder = folder / part
            meta = json.loads((folder / "zarr.json").read_text())
            assert meta == {"attributes": {}, "zarr_format": 3, "node_type": "group"}, folder
        group = zarr.open_group(root, mode="r", use_consolidated=False)
        assert isinstance(group[r["path"]], zarr.Array)


def test_consolidated_metadata_lists_every_array(output):
    out, records, _ = output
    by_store: dict[str, dict[str, tuple[int, ...]]] = {}
    for r in records:
        by_store.setdefault(r["store"], {})[r["path"]] = tuple(r["shape"])
    for store, paths in by_store.items():
        meta = store_metadata(out, store)
        assert set(meta) == set(paths)
        for path in paths:
            on_disk = json.loads((out / f"{store}.zarr" / path / "zarr.json").read_text())
            assert meta[path] == on_disk, path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata is not part of the v3 spec
            group = zarr.open_consolidated(out / f"{store}.zarr", zarr_format=3)
        assert group.attrs["store"] == store
        for path, shape in paths.items():
            assert group[path].shape == shape, path


def test_consolidated_root_is_the_one_zarr_writes(output, tmp_path):
    """Each store's root ``zarr.json``, written without zarr, is byte for byte the document
    ``zarr.consolidate_metadata`` writes for the same store."""
    out, records, _ = output
    for store in sorted({r["store"] for r in records}):
        root = out / f"{store}.zarr"
        copy = tmp_path / root.name
        shutil.copytree(root, copy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata is not part of the v3 spec
            zarr.consolidate_metadata(copy)
        assert (root / "zarr.json").read_bytes() == (copy / "zarr.json").read_bytes(), store
