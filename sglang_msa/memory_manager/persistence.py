"""Document tensors on disk, for a server started with a memory directory.

    <memory_dir>/manifest.json                     what wrote the tensors (model, layers, chunking)
    <memory_dir>/tensors/<memory_key>/memory.json         the memory's name, owner tenant, placement
    <memory_dir>/tensors/<memory_key>/<gid>.safetensors   one stored document, all routed layers

(`memory_key`: the memory incarnation's key, see `server/metadata.py`.)

Under tensor parallelism (`--tp N`) each rank keeps what it holds (its KV heads of every
document's content, and the router keys of the documents it routes) under
`<memory_dir>/ranks/<rank>/tensors/…`, and the manifest names the number of ranks, so the
directory is only reopened with the same `--tp`. At start-up the ranks keep the documents every
one of them has (`common_to_all_ranks`): a document is acknowledged only after every rank wrote
it, so one that some rank lacks was interrupted and is removed.

A document file is written to a temporary name, fsynced, renamed into place and its directory
fsynced before the document becomes visible to routing, so a file under its final name is always
complete. Metadata (which documents were acknowledged, their ids and texts) lives in the HTTP
server's SQLite file beside it; `server/memory_api.py` reconciles the two at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sglang_msa.memory_manager.store import (
    LAYER_TENSOR_NAMES,
    ROUTER_KEY_NAMES,
    ArchivedMemory,
    LayerTensors,
    MemoryOperationError,
    StoredDocument,
)

logger = logging.getLogger(__name__)

FORMAT = "sglang-msa-document-1"
MEMORY_FILE = "memory.json"  # in each memory's directory: {"memory_id": ..., "owner": tenant or null, "placement": ...}


class ArchiveMismatchError(RuntimeError):
    """The memory directory was written for another model or other memory options."""


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """`write(tmp_path)`, then fsync and rename into place: `path` is either absent or complete."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def document_tensors(doc: StoredDocument, router_keys: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat tensors and string metadata of a document (router keys that are the pooled keys
    themselves, as in training-free mode, are stored once; without `router_keys`, not at all:
    another rank routes the document)."""
    tensors, shared = {}, []
    for layer, parts in doc.layers.items():
        for name, tensor in parts.tensors().items():
            if name in ROUTER_KEY_NAMES and not router_keys:
                continue
            if name == "router_k" and tensor is parts.pooled_k:
                shared.append(str(layer))
                continue
            tensors[f"{layer}.{name}"] = tensor.contiguous()
    metadata = {"format": FORMAT, "gid": str(doc.gid), "num_tokens": str(doc.num_tokens),
                "num_chunks": str(doc.num_chunks), "router_is_pooled_k": ",".join(shared),
                "router_rank": str(doc.router_rank)}
    return tensors, metadata


def read_document(path: Path) -> StoredDocument:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not an sglang-msa document file")
    tensors = load_file(str(path))
    shared = {int(layer) for layer in metadata["router_is_pooled_k"].split(",") if layer}
    layers = {}
    for layer in sorted({int(name.split(".")[0]) for name in tensors}):
        parts = {name: tensors.get(f"{layer}.{name}") for name in LAYER_TENSOR_NAMES}
        if layer in shared:
            parts["router_k"] = parts["pooled_k"]
        layers[layer] = LayerTensors(**parts)
    return StoredDocument(gid=int(metadata["gid"]), num_tokens=int(metadata["num_tokens"]),
                          num_chunks=int(metadata["num_chunks"]), layers=layers,
                          router_rank=int(metadata.get("router_rank", 0)))


class DocumentArchive:
    """Committed documents' tensors under a memory directory (one file per document); with
    `ranks` > 1, those of tensor-parallel rank `rank`."""

    def __init__(self, root: str | Path, fingerprint: dict, rank: int = 0, ranks: int = 1):
        self.root = Path(root)
        self.rank = rank
        if ranks > 1:
            fingerprint = {**fingerprint, "tensor_parallel_size": ranks}
        self.tensors_dir = self.root / "ranks" / str(rank) / "tensors" if ranks > 1 else self.root / "tensors"
        self.tensors_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.root / "manifest.json"
        if manifest.exists():
            written = json.loads(manifest.read_text())
            if written != fingerprint:
                changed = sorted(k for k in set(written) | set(fingerprint) if written.get(k) != fingerprint.get(k))
                raise ArchiveMismatchError(
                    f"sglang-msa: the memory directory {self.root} holds memories encoded with other settings "
                    f"({', '.join(changed)} differ: {[written.get(k) for k in changed]} there, "
                    f"{[fingerprint.get(k) for k in changed]} now); use another directory or the same settings"
                )
        else:
            write_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(fingerprint, indent=2)))

    def memory_dir(self, memory_key: str) -> Path:
        return self.tensors_dir / memory_key

    def document_path(self, memory_key: str, gid: int) -> Path:
        return self.memory_dir(memory_key) / f"{gid}.safetensors"

    def create_memory(self, memory_key: str, memory_id: str, owner: str | None, placement: str = "auto") -> None:
        """The memory's directory, complete with its description, appears at once (rename)."""
        staging = self.tensors_dir / f".creating-{uuid.uuid4().hex}"
        staging.mkdir()
        description = json.dumps({"memory_id": memory_id, "owner": owner, "placement": placement})
        write_atomically(staging / MEMORY_FILE, lambda tmp: tmp.write_text(description))
        os.replace(staging, self.memory_dir(memory_key))
        fsync_directory(self.tensors_dir)

    def drop_memory(self, memory_key: str) -> None:
        """Rename away (atomic), then delete: a crash leaves either the whole memory or none."""
        path = self.memory_dir(memory_key)
        if not path.exists():
            return
        trash = self.tensors_dir / f".dropped-{uuid.uuid4().hex}"
        os.replace(path, trash)
        fsync_directory(self.tensors_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def write_document(self, memory_key: str, doc: StoredDocument) -> None:
        directory = self.memory_dir(memory_key)
        if not directory.is_dir():
            raise MemoryOperationError(f"memory {memory_key!r} does not exist", 404)
        tensors, metadata = document_tensors(doc, router_keys=doc.router_rank == self.rank)
        write_atomically(self.document_path(memory_key, doc.gid),
                         lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def remove_document(self, memory_key: str, gid: int) -> None:
        path = self.document_path(memory_key, gid)
        if path.exists():
            path.unlink()
            fsync_directory(path.parent)

    def load(self) -> dict[str, ArchivedMemory]:
        """Every memory, its owner and its complete documents; leftovers of interrupted writes
        are removed."""
        for leftover in [*self.tensors_dir.glob(".dropped-*"), *self.tensors_dir.glob(".creating-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        memories: dict[str, ArchivedMemory] = {}
        for directory in sorted(p for p in self.tensors_dir.iterdir() if p.is_dir()):
            for tmp in directory.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            docs = []
            for path in sorted(directory.glob("*.safetensors")):
                try:
                    docs.append(read_document(path))
                except Exception as exc:  # never half a document: report it and leave it out
                    logger.error("sglang-msa: skipping unreadable document file %s: %s", path, exc)
            description = json.loads((directory / MEMORY_FILE).read_text())
            memories[directory.name] = ArchivedMemory(description["owner"], sorted(docs, key=lambda doc: doc.gid),
                                                      description.get("placement", "auto"), description.get("memory_id"))
        return memories


def common_to_all_ranks(memories: dict[str, ArchivedMemory], archive: DocumentArchive,
                        everyone: list[dict[str, list[int]]]) -> dict[str, ArchivedMemory]:
    """The memories and documents every tensor-parallel rank holds (`everyone`: each rank's
    memory ids and gids); what only some ranks hold is removed from this rank's archive."""
    common = {memory_key: set.intersection(*(set(contents[memory_key]) for contents in everyone))
              for memory_key in set.intersection(*(set(contents) for contents in everyone))}
    kept = {}
    for memory_key, archived in memories.items():
        if memory_key not in common:
            logger.warning("sglang-msa: memory %r is not on every rank (interrupted creation): removed", memory_key)
            archive.drop_memory(memory_key)
            continue
        documents = []
        for doc in archived.documents:
            if doc.gid in common[memory_key]:
                documents.append(doc)
            else:
                logger.warning("sglang-msa: document %d of %r is not on every rank (interrupted write): removed",
                               doc.gid, memory_key)
                archive.remove_document(memory_key, doc.gid)
        kept[memory_key] = archived._replace(documents=documents)
    return kept
