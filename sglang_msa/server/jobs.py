"""Ingestion jobs: `POST /v1/memories/{id}/documents?wait=false` answers 202 with a job at once;
the documents are stored in the background, batch after batch, by the same path as the
synchronous call (`MemoryAPI.store_documents`).

A job is bound to its memory's incarnation (`memory_key`), not its name, and is found only
through the caller's own memory: another tenant's job answers 404 like a missing one. Its rows
live in the metadata database (`job_records`): with a memory directory a restarted server
resumes unfinished jobs itself (`resume`), and a document stored just before a crash is found
`existing` (same doc_id and text), never stored twice. Cancellation takes effect between
batches, so every document is either fully stored and listed, or absent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from sglang_msa.server import schemas
from sglang_msa.server.errors import APIError
from sglang_msa.server.job_records import UNFINISHED, JobDocument, JobOutcome, JobRecord
from sglang_msa.server.metadata import MemoryRecord

# a job's documents in flight at once: enough for the scheduler to batch their prefills, few
# enough that progress moves every few seconds (about 8K tokens of text)
JOB_BATCH_DOCUMENTS = 32
JOB_BATCH_CHARS = 32_768
MAX_FAILURES_SHOWN = 100
logger = logging.getLogger(__name__)


def new_job_id() -> str:
    return uuid.uuid4().hex[:20]


def within_chars(documents: list[JobDocument], limit: int) -> list[JobDocument]:
    """The leading documents whose texts hold at most `limit` characters (at least one)."""
    total = 0
    for count, document in enumerate(documents):
        total += len(document.text)
        if total > limit and count:
            return documents[:count]
    return documents


@dataclass
class JobRun:
    """This process's run of a job: the encoding rate is measured over it."""

    started: float
    tokens: int = 0
    finished: float | None = None

    def rate(self) -> float | None:
        elapsed = (self.finished or time.monotonic()) - self.started
        return self.tokens / elapsed if self.tokens and elapsed > 0 else None


class IngestionJobs:
    def __init__(self, api):
        self.api = api
        self.metadata = api.metadata
        self._tasks: dict[str, asyncio.Task] = {}
        self._runs: dict[str, JobRun] = {}

    def submit(self, memory_id: str, body: schemas.AddDocumentsRequest) -> dict:
        """Check the submission as the synchronous call does (4xx naming the field), record the
        job and its documents, start it; its status. Documents without a doc_id get
        `<job_id>-<index>`, so a resumed job recognises them."""
        record = self.api.check_documents(memory_id, body)
        job_id = new_job_id()
        docs = [(doc.doc_id or f"{job_id}-{index}", doc.text) for index, doc in enumerate(body.documents)]
        if not self.metadata.add_job(job_id, record.memory_key, body.replace, docs):
            raise APIError(404, f"memory {memory_id!r} does not exist", "memory_id")
        self._start(job_id, record)
        return self.status(memory_id, job_id)

    def resume(self) -> None:
        """Start every unfinished job of the metadata database (server start-up)."""
        records = self.metadata.memories()
        jobs = self.metadata.unfinished_jobs()
        for job in jobs:
            self._start(job.job_id, records[job.memory_key])
        if jobs:
            logger.info("sglang-msa: resumed %d unfinished ingestion jobs", len(jobs))

    def _start(self, job_id: str, record: MemoryRecord) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job_id, record), name=f"sglang-msa-job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    def _job(self, record: MemoryRecord, job_id: str) -> JobRecord:
        job = self.metadata.find_job(record.memory_key, job_id)
        if job is None:
            raise APIError(404, f"job {job_id!r} does not exist in memory {record.memory_id!r}", "job_id")
        return job

    async def _run(self, job_id: str, record: MemoryRecord) -> None:
        try:
            await self._store_pending(job_id, record)
        except Exception:  # a job must not die silently: it is marked failed and logged
            logger.exception("sglang-msa: ingestion job %s failed", job_id)
            self.metadata.set_job_state(job_id, "failed")

    async def _store_pending(self, job_id: str, record: MemoryRecord) -> None:
        metadata = self.metadata
        if not metadata.set_job_state(job_id, "running"):
            return
        job = metadata.find_job(record.memory_key, job_id)
        if job is not None and job.tokens_total is None:
            metadata.set_job_tokens_total(job_id, await asyncio.to_thread(self._count_tokens, metadata.job_texts(job_id)))
        run = self._runs[job_id] = JobRun(time.monotonic())
        try:
            while True:
                job = metadata.find_job(record.memory_key, job_id)
                if job is None or job.state not in UNFINISHED:  # cancelled, or its memory deleted
                    return
                batch = within_chars(metadata.pending_job_documents(job_id, JOB_BATCH_DOCUMENTS), JOB_BATCH_CHARS)
                if not batch:
                    break
                docs = [schemas.DocumentIn(text=doc.text, doc_id=doc.doc_id) for doc in batch]
                try:
                    results = await self.api.store_documents(record, docs, job.replace_existing, strict=False)
                except APIError as exc:  # the memory was deleted between batches
                    logger.warning("sglang-msa: ingestion job %s stopped: %s", job_id, exc.message)
                    metadata.set_job_state(job_id, "failed")
                    return
                metadata.record_job_outcomes(job_id, [
                    JobOutcome(doc.position, "stored" if result.state == "replaced" else result.state,
                               result.num_tokens, result.status, result.error)
                    for doc, result in zip(batch, results)])
                run.tokens += sum(result.num_tokens for result in results if result.state in ("stored", "replaced"))
            metadata.set_job_state(job_id, "done")
        finally:
            run.finished = time.monotonic()

    def _count_tokens(self, texts: list[str]) -> int:
        if not texts:
            return 0
        return sum(len(ids) for ids in self.api.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def status(self, memory_id: str, job_id: str) -> dict:
        record = self.api.require_memory(memory_id)
        job = self._job(record, job_id)
        progress = self.metadata.job_progress(job_id)
        counts = {state: progress.get(state, (0, 0)) for state in ("stored", "existing", "failed", "pending")}
        done_tokens = counts["stored"][1] + counts["existing"][1]
        run = self._runs.get(job_id)
        rate = run.rate() if run else None
        eta = None
        if rate and job.state in UNFINISHED and job.tokens_total is not None:
            eta = max(job.tokens_total - done_tokens, 0) / rate
        return schemas.IngestionJobStatus(
            job_id=job_id, memory_id=memory_id, state=job.state,
            documents=schemas.JobDocumentCounts(total=sum(n for n, _ in counts.values()),
                                                **{state: n for state, (n, _) in counts.items()}),
            tokens=schemas.JobTokens(total=job.tokens_total, done=done_tokens),
            tokens_per_s=rate, eta_s=eta, failures=self.metadata.job_failures(job_id, MAX_FAILURES_SHOWN),
            created_at=job.created_at, finished_at=job.finished_at,
        ).model_dump()

    def list_jobs(self, memory_id: str) -> dict:
        key = self.api.require_memory(memory_id).memory_key
        return {"memory_id": memory_id, "jobs": [self.status(memory_id, job_id)
                                                 for job_id in self.metadata.list_jobs(key)]}

    def cancel(self, memory_id: str, job_id: str) -> dict:
        """Stop the job after the batch under way (whose documents are stored whole or not at
        all); a finished job is left as it is. Its status."""
        record = self.api.require_memory(memory_id)
        self._job(record, job_id)
        self.metadata.set_job_state(job_id, "cancelled")
        return self.status(memory_id, job_id)
