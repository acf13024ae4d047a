"""Saves of an analysis fitted by several processes (:mod:`infkit.distributed`): one save per rank and a manifest.

A save to ``runs/ekfac`` from a job of W ranks writes, inside that folder:

* ``rank<r>-of-<W>/`` — rank r's own save (:func:`infkit.persist.save`, atomic, checksummed): the shared factors,
  its shard's train side (or a pointer to its on-disk store), and its settings;
* ``shards.json`` — written by rank 0 once every rank's save is in place (atomically: a temporary file renamed
  over the old one): the world size, each rank's train examples and the checksum of each rank's metadata.

A load in a job of the same world size reads each rank's own save, after checking that it is the one the
manifest names (a rank's save rewritten by a later, unfinished save is refused). Another world size is refused
with the command to use: the shards hold each rank's train rows, so they are not re-cut here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from infkit.errors import InfkitError

MANIFEST = "shards.json"


def shard_folder(rank: int, size: int) -> str:
    return f"rank{rank}-of-{size}"


def save(analysis, path: Path, save_one) -> Path:
    """Every rank saves its own folder with ``save_one(analysis, folder)``; rank 0 then writes the manifest."""
    world = analysis.world
    folder = Path(path)
    if (folder / "analysis.json").exists():
        raise InfkitError(f"{folder} holds a save of one process; a job of {world.size} ranks saves a folder of "
                          "per-rank saves: choose another path (or delete that save yourself)")
    own = save_one(analysis, folder / shard_folder(world.rank, world.size))
    meta = json.loads((own / "analysis.json").read_text())
    everyone = world.gather_objects({"folder": own.name, "start": analysis.shard.start, "stop": analysis.shard.stop,
                                     "meta_sha256": meta["meta_sha256"]}, "save the shards")
    if world.rank == 0:
        manifest = {"format": 1, "world_size": world.size, "n_train": analysis.n_train, "shards": everyone}
        staging = folder / f".{MANIFEST}.partial-{os.getpid()}"
        with staging.open("w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, folder / MANIFEST)
    world.sum_number(0.0, "finish the save")  # every rank returns once the manifest is in place
    return folder


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InfkitError(f"{Path(folder) / MANIFEST} is damaged ({err}); save the analysis again") from err


def own_save(folder: Path, world) -> Path:
    """The folder this rank loads: its shard's save when ``folder`` holds a manifest, else ``folder`` itself
    (refused when the world sizes of the save and of this job differ)."""
    manifest = read_manifest(folder)
    if manifest is None:
        if world.active:
            raise InfkitError(
                f"{folder} holds a save of one process, and this job has {world.size} ranks: load it with "
                "distributed=False in one process, or fit the analysis in this job and save it (each rank then "
                "saves its shard)")
        return Path(folder)
    saved = manifest["world_size"]
    if saved != world.size:
        raise InfkitError(
            f"{folder} was saved by a job of {saved} ranks (each holds its shard of the train data), and this "
            f"{'job has ' + str(world.size) + ' ranks' if world.active else 'is one process'}: load it in a job "
            f"of {saved} (torchrun --nproc-per-node {saved} ...), or fit again with this world size")
    entry = manifest["shards"][world.rank]
    own = Path(folder) / entry["folder"]
    try:
        meta = json.loads((own / "analysis.json").read_text())
    except (FileNotFoundError, ValueError) as err:
        raise InfkitError(f"{own}, rank {world.rank}'s save named by {MANIFEST}, is missing or damaged: save the "
                          "analysis again") from err
    if meta.get("meta_sha256") != entry["meta_sha256"]:
        raise InfkitError(f"{own} is not the save {MANIFEST} names (a later save of this rank did not finish): "
                          "save the analysis again from all ranks")
    return own
