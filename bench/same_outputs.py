"""Do this tree's conversions write the same bytes as the recorded golden outputs?

``tests/golden/outputs.json`` records, for each combination of synthetic preset (seed 0) and
conversion options below, every output array's store, path, shape, dtype and checksum (the CRC32
of its chunk file), plus the sha256 of the synthetic checkpoint it was converted from. This script
synthesises each preset with this tree's ``pipeline.synth``, converts it with this tree's
``mimo-shard`` (``python -m pipeline.cli``, default options plus the combination's), lists the
arrays with ``mimo-manifest list --json`` and prints one line per combination::

    tiny/4                          identical (164 arrays)
    small/8                         3 arrays differ: device-000/layers/1/attn/qkv checksum, ...

It exits 1 when any combination differs (or its checkpoint, or the reference tree's output),
0 when all are identical.

    python bench/same_outputs.py [--combo tiny/4 ...] [--work DIR] [--keep]
                                 [--reference-tree DIR]
    python bench/same_outputs.py --regenerate

``--reference-tree DIR`` also converts each checkpoint with the code in DIR (for example
``git archive HEAD | tar -x -C DIR``) and prints ``mimo-manifest diff`` of the two outputs.
``--regenerate`` rewrites the golden file from this tree's outputs instead of comparing: do it
only when an output change is intended, and say so in the commit.

Every step runs in a child process whose imports resolve to the tree it is meant to test, so the
script itself imports nothing from the project.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "outputs.json"
SEED = 0
FIELDS = ("store", "path", "shape", "dtype", "checksum")
REGENERATE = "python bench/same_outputs.py --regenerate"

# The recorded combinations: preset, device count, and the mimo-shard options beyond the defaults
# (option name -> value; the same names are the keyword arguments of ``pipeline.convert.convert``).
COMBOS: tuple[dict[str, Any], ...] = (
    *({"preset": "tiny", "devices": n, "options": {}} for n in (1, 2, 4, 8)),
    *({"preset": "small", "devices": n, "options": {}} for n in (1, 2, 4, 8)),
    {"preset": "tiny", "devices": 4, "options": {"dtype": "float32"}},
    {"preset": "tiny", "devices": 4, "options": {"layers": "0-2", "experts": "0-7"}},
)


def combo_key(combo: dict[str, Any]) -> str:
    """``preset/devices`` then each option's value: ``tiny/4``, ``tiny/4/layers=0-2/experts=0-7``.

    A lone dtype is written bare (``tiny/4/float32``)."""
    opts = combo["options"]
    tail = [opts["dtype"]] if list(opts) == ["dtype"] else [f"{k}={v}" for k, v in opts.items()]
    return "/".join([combo["preset"], str(combo["devices"]), *tail])


def normalise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The golden fields of array records, sorted by (store, path)."""
    rows = [{k: r[k] for k in FIELDS} for r in records]
    return sorted(rows, key=lambda r: (r["store"], r["path"]))


def arrays_sha256(rows: list[dict[str, Any]]) -> str:
    """sha256 of the ``store<TAB>path<TAB>checksum`` lines of ``rows`` (in their order)."""
    text = "".join(f"{r['store']}\t{r['path']}\t{r['checksum']}\n" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_sha256(ckpt: Path) -> str:
    """sha256 over every file of a checkpoint folder: relative name, then contents, sorted."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(ckpt).rglob("*") if q.is_file()):
        h.update(p.relative_to(ckpt).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def differences(golden: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[str]:
    """One line per array that is missing, unexpected, or differs in shape, dtype or checksum,
    in (store, path) order: ``device-000/layers/1/attn/qkv: checksum crc32:.. -> crc32:..``."""
    want = {(r["store"], r["path"]): r for r in golden}
    have = {(r["store"], r["path"]): r for r in got}
    lines = []
    for key in sorted(want.keys() | have.keys()):
        name = "/".join(key)
        if key not in have:
            lines.append(f"{name}: missing")
        elif key not in want:
            lines.append(f"{name}: not in the golden outputs")
        else:
            changed = [
                f"{f} {want[key][f]} -> {have[key][f]}"
                for f in ("shape", "dtype", "checksum")
                if want[key][f] != have[key][f]
            ]
            if changed:
                lines.append(f"{name}: {', '.join(changed)}")
    return lines


def load_golden(path: Path = GOLDEN) -> dict[str, Any]:
    """The golden document: ``seed``, ``checkpoints`` (preset -> sha256) and ``combos``
    (key -> preset, devices, options, arrays_sha256, arrays)."""
    return json.loads(path.read_text())


def dumps_golden(doc: dict[str, Any]) -> str:
    """The golden document as JSON with one array record per line."""
    head = json.dumps({k: v for k, v in doc.items() if k != "combos"}, indent=1)
    parts = []
    for key, c in doc["combos"].items():
        meta = json.dumps({k: v for k, v in c.items() if k != "arrays"})
        rows = ",\n".join("   " + json.dumps(a) for a in c["arrays"])
        parts.append(f'  {json.dumps(key)}: {meta[:-1]}, "arrays": [\n{rows}\n  ]}}')
    return head[:-2] + ',\n "combos": {\n' + ",\n".join(parts) + "\n }\n}\n"


# ------------------------------------------------------------------------------ child processes
def _run(tree: Path, *args: str, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
    """``python -m ARGS`` with imports resolving to ``tree``: exit code and stdout.

    Exits when the child's exit code is not in ``ok``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    res = subprocess.run(
        [sys.executable, "-m", *args], cwd=tree, env=env, capture_output=True, text=True
    )
    if res.returncode not in ok:
        sys.exit(f"same_outputs: `python -m {' '.join(args)}` in {tree} failed:\n{res.stderr}")
    return res.returncode, res.stdout


def synthesise(tree: Path, preset: str, dest: Path) -> Path:
    _run(tree, "pipeline.synth", str(dest), "--preset", preset, "--seed", str(SEED), "--force")
    return dest


def convert(tree: Path, ckpt: Path, out: Path, combo: dict[str, Any]) -> None:
    opts = [a for k, v in combo["options"].items() for a in (f"--{k}", str(v))]
    _run(tree, "pipeline.cli", str(ckpt), str(out), "-n", str(combo["devices"]), *opts, "-q")


def list_arrays(tree: Path, out: Path) -> list[dict[str, Any]]:
    return normalise(json.loads(_run(tree, "loader.cli", "list", str(out), "--json")[1]))


def manifest_diff(tree: Path, a: Path, b: Path) -> tuple[bool, str]:
    """Whether ``mimo-manifest diff A B`` finds identical content, and its report."""
    code, text = _run(tree, "loader.cli", "diff", str(a), str(b), ok=(0, 1))
    return code == 0, text


# ---------------------------------------------------------------------------------------- main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--combo", action="append", help="Only this combination (repeatable).")
    p.add_argument("--golden", type=Path, default=GOLDEN, help="Golden file (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temp dir).")
    p.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    p.add_argument("--reference-tree", type=Path, default=None, metavar="DIR")
    p.add_argument(
        "--regenerate", action="store_true", help="Rewrite the golden file from this tree."
    )
    args = p.parse_args(argv)
    if args.regenerate and (args.combo or args.reference_tree):
        p.error("--regenerate records every combination; it takes no --combo/--reference-tree")
    if args.reference_tree and not (args.reference_tree / "pipeline" / "cli.py").is_file():
        p.error(f"--reference-tree {args.reference_tree}: no pipeline/cli.py there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    combos = {combo_key(c): c for c in COMBOS}
    golden = None if args.regenerate else load_golden(args.golden)
    if golden is not None:
        combos = {k: c for k, c in combos.items() if k in golden["combos"]}
        combos |= {k: golden["combos"][k] for k in golden["combos"].keys() - combos.keys()}
    unknown = sorted(set(args.combo or []) - combos.keys())
    if unknown:
        print(f"same_outputs: unknown --combo {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.combo:
        combos = {k: combos[k] for k in args.combo}
    work = args.work or Path(tempfile.mkdtemp(prefix="same-outputs-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _check(args, combos, golden, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _check(
    args: argparse.Namespace,
    combos: dict[str, dict[str, Any]],
    golden: dict[str, Any] | None,
    work: Path,
) -> int:
    checkpoints: dict[str, tuple[Path, str]] = {}
    previous = (
        load_golden(args.golden)["combos"] if golden is None and args.golden.is_file() else {}
    )
    recorded: dict[str, dict[str, Any]] = {}
    failed = False
    for key, combo in combos.items():
        t0 = time.perf_counter()
        preset = combo["preset"]
        if preset not in checkpoints:
            ckpt = synthesise(ROOT, preset, work / f"ckpt-{preset}")
            checkpoints[preset] = (ckpt, checkpoint_sha256(ckpt))
            want = golden["checkpoints"].get(preset) if golden else None
            if want is not None and checkpoints[preset][1] != want:
                failed = True
                print(
                    f"{preset + ' checkpoint':30s}  differs from the golden one "
                    "(pipeline.synth changed): the outputs below cannot match"
                )
        ckpt = checkpoints[preset][0]
        out = work / "out" / key.replace("/", "_")
        convert(ROOT, ckpt, out, combo)
        rows = list_arrays(ROOT, out)
        seconds = time.perf_counter() - t0
        if golden is None:
            before = previous.get(key, {}).get("arrays")
            change = "new" if before is None else f"{len(differences(before, rows))} changed"
            recorded[key] = {
                "preset": preset,
                "devices": combo["devices"],
                "options": combo["options"],
                "arrays_sha256": arrays_sha256(rows),
                "arrays": rows,
            }
            print(f"{key:30s}  recorded ({len(rows)} arrays, {change}, {seconds:.1f} s)")
        else:
            diff = differences(golden["combos"][key]["arrays"], rows)
            failed |= bool(diff)
            verdict = (
                f"{len(diff)} arrays differ: {'; '.join(diff[:3])}"
                if diff
                else f"identical ({len(rows)} arrays, {seconds:.1f} s)"
            )
            print(f"{key:30s}  {verdict}", flush=True)
        if args.reference_tree is not None:
            ref = work / "ref" / key.replace("/", "_")
            convert(args.reference_tree.resolve(), ckpt, ref, combo)
            print(f"  mimo-manifest diff {ref} {out}:")
            same, report = manifest_diff(ROOT, ref, out)
            failed |= not same
            for line in report.splitlines():
                print(f"    {line}")
            if not args.keep:
                shutil.rmtree(ref, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if golden is None:
        doc = {
            "regenerate": REGENERATE,
            "seed": SEED,
            "checkpoints": {p: sha for p, (_, sha) in sorted(checkpoints.items())},
            "combos": recorded,
        }
        args.golden.parent.mkdir(parents=True, exist_ok=True)
        args.golden.write_text(dumps_golden(doc))
        print(f"wrote {args.golden} ({args.golden.stat().st_size:,} bytes)")
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
