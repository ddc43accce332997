"""Tenant soak: three tenants race on shared memory names against one msa server, loopback only.

A server with 3 tenants' API keys, an admin key and a memory directory (a tiny random Llama unless
--model). --tenants-threads threads per tenant create memories on names all tenants share, add batches
of documents, delete documents and memories (sometimes during an addition), query with routing details
and act hostile (`/generate` with rid "msa-" dropped after 0.5 s; `/abort_request` without a key, with a
tenant key, rarely with the admin key), recording every acknowledgement in a ledger. After half of the
--duration seconds of load the server is SIGKILLed and restarted on the same directory (the pause is
not load time); after the restart and at the end every tenant's memories are checked against the
ledger. Violations: cross_tenant, ghost, lost_ack, http_5xx, namespace, admin_open, scheduler_dead.
Prints a table, writes <out>/tenant_soak.json (every violation's details, 4xx/5xx messages, command).

    SGLANG_USE_CPU_ENGINE=1 .venv/bin/python benchmarks/tenant_soak.py [--duration 600] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import secrets
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

from sglang_msa.server_process import ServerProcess, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import build_tiny_model  # noqa: E402

TENANTS = ("tenant-a", "tenant-b", "tenant-c")
NAMES = ("race-0", "race-1", "race-2")
KINDS = ("cross_tenant", "ghost", "lost_ack", "http_5xx", "namespace", "admin_open", "scheduler_dead")
OPERATIONS = {"create": 1, "add": 4, "delete_doc": 2, "delete_memory": 1, "query": 3, "hostile": 2}
HOSTILE = {"hostile_generate": 8, "abort_nokey": 5, "abort_tenant": 5, "abort_own": 5}
ADMIN_ABORT_WEIGHT = 2  # with --admin-aborts: the admin aborts every request (its victims answer 503)
WORDS = "river lantern garden silver market harbor winter meadow copper forest engine violet archive".split()
HEADER = re.compile(r"^\[(\S+) (\S+) incarnation (\d+) doc (\S+)\]")
TIMEOUT_S = 120


@dataclass
class Incarnation:
    """One life of a tenant's memory name, as the server acknowledged it."""
    tenant: str
    name: str
    number: int
    exists: bool | None = True  # None: its creation or deletion was cut off
    present: set[str] = field(default_factory=set)  # addition acknowledged, deletion not
    deleted: set[str] = field(default_factory=set)  # deletion acknowledged
    pending: set[str] = field(default_factory=set)  # in a request in flight
    uncertain: set[str] = field(default_factory=set)  # in a request cut off: stored or not
    serial: int = 0

    def may_hold(self) -> set[str]:
        return self.present | self.pending | self.uncertain


@dataclass
class Tenant:
    name: str
    key: str
    current: dict[str, Incarnation] = field(default_factory=dict)  # memory name -> its live life
    history: list[Incarnation] = field(default_factory=list)  # every life the server (maybe) created
    busy_names: set[str] = field(default_factory=set)  # a create or delete of the name in flight
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: Counter = field(default_factory=Counter)  # endpoint -> 5xx answers
    errors: Counter = field(default_factory=Counter)  # "kind status: message" of every 4xx/5xx answer
    violations: Counter = field(default_factory=Counter)  # distinct: each (kind, key) once
    occurrences: Counter = field(default_factory=Counter)  # every sighting (in both checks: 2)
    seen: set[tuple] = field(default_factory=set)
    details: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def violation(self, kind: str, key: tuple | None = None, **detail) -> None:
        """Count a violation; one with a key (its document, or tenant and name) counts once."""
        with self.lock:
            self.occurrences[kind] += 1
            if key is None or (kind, *key) not in self.seen:
                self.seen.add((kind, *(key or ())))
                self.violations[kind] += 1
                self.details += [{"kind": kind, **detail}] if len(self.details) < 300 else []


class Soak:
    """The server, the tenants' ledgers and the HTTP calls, shared by the worker threads."""

    def __init__(self, args: argparse.Namespace, work: Path, model: Path):
        self.args, self.work, self.model = args, work, model
        self.admin_key = secrets.token_hex(16)
        self.tenants = [Tenant(name, secrets.token_hex(16)) for name in TENANTS]
        (work / "keys.json").write_text(json.dumps({"keys": {t.key: t.name for t in self.tenants}}))
        options = {"top_k_docs": 4, "chunk_size": 16, "routed_layers": "all",
                   "api_keys_file": str(work / "keys.json")}
        self.server_args = ["--max-total-tokens", "16384", "--log-level", "warning", "--msa-config",
                            json.dumps(options), "--msa-memory-dir", str(work / "memories"),
                            "--admin-api-key", self.admin_key]
        self.stats, self.gate, self.stop = Stats(), threading.Event(), threading.Event()
        self.servers: list[ServerProcess] = []

    def start(self) -> float:
        began = time.monotonic()
        self.servers.append(start_server(self.model, "msa", extra_args=self.server_args,
                                         log_path=self.work / f"server-{len(self.servers)}.log"))
        return time.monotonic() - began

    def kill_and_restart(self) -> float:
        """SIGKILL the process group and start again on the same directory. Workers' next calls wait at
        the gate until it opens after the check; the calls cut off fail at once (connection reset)."""
        self.gate.clear()
        self.servers[-1].kill()
        return self.start()

    def call(self, kind: str, method: str, path: str, key: str | None = None, body: dict | None = None,
             timeout: float = TIMEOUT_S, gated: bool = True) -> tuple[int | None, dict]:
        """One request; status None for no answer (connection lost, timeout). Records latency and 5xx."""
        if gated:
            self.gate.wait()
        status, payload, began = None, {}, time.perf_counter()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = requests.request(method, self.servers[-1].base_url + path, json=body, headers=headers,
                                        timeout=timeout)
            status = response.status_code
            payload = response.json()
        except (requests.RequestException, ValueError):  # no answer, or not JSON
            pass
        payload = payload if isinstance(payload, dict) else {}
        endpoint = f"{method} " + re.sub(r"/documents/[^/]+", "/documents/{doc_id}", re.sub(
            r"^/v1/memories/(?!-/)[^/?]+", "/v1/memories/{id}", path.split("?")[0]))
        with self.stats.lock:
            self.stats.latencies[kind].append(time.perf_counter() - began)
            self.stats.statuses[kind][str(status)] += 1
            if status and status >= 500:
                self.stats.server_errors[endpoint] += 1
            if status and status >= 400:
                error = payload.get("error", payload.get("detail", ""))
                message = error.get("message", "") if isinstance(error, dict) else str(error)
                self.stats.errors[f"{kind} {status}: " + re.sub(r"'[^']*'", "'…'", message)[:90]] += 1
        if status and status >= 500:
            self.stats.violation("http_5xx", endpoint=endpoint, status=status, body=str(payload)[:200])
        return status, payload

    def worker(self, tenant: Tenant, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            operation = rng.choices(list(OPERATIONS), weights=list(OPERATIONS.values()))[0]
            if operation in ("create", "delete_memory") or not tenant.current:
                self.lifecycle(tenant, rng, create=operation == "create" or not tenant.current)
            else:
                getattr(self, operation)(tenant, rng)

    def lifecycle(self, tenant: Tenant, rng: random.Random, create: bool) -> None:
        """Create a memory on a free name, or delete one (preferably with an addition in flight) and
        after up to 1 s create it again (or another free name if another tenant took it)."""
        with tenant.lock:
            free = [n for n in NAMES if n not in tenant.current and n not in tenant.busy_names]
            rng.shuffle(free)
            live = [n for n, inc in tenant.current.items() if n not in tenant.busy_names and inc.exists]
            adding = [n for n in live if tenant.current[n].pending]
            names = free if create else [rng.choice(adding or live), *free] if live else []
            tenant.busy_names.update(names)
        try:
            if create or (names and self.delete_memory(tenant, names[0])):
                time.sleep(0 if create else rng.uniform(0, 1))
                self.create(tenant, names)
        finally:
            with tenant.lock:
                tenant.busy_names.difference_update(names)

    def create(self, tenant: Tenant, names: list[str]) -> None:
        """The first of `names` the server lets this tenant create; a 1 s back-off when it lets none."""
        for name in names:
            incarnation = Incarnation(tenant.name, name, len(tenant.history) + 1)
            status, _ = self.call("create", "POST", "/v1/memories", tenant.key, {"memory_id": name})
            if status == 201 or status is None or status >= 500:
                incarnation.exists = True if status == 201 else None
                with tenant.lock:
                    tenant.current[name] = incarnation
                    tenant.history.append(incarnation)
                return
            if status == 409:  # target: names are per tenant, only one's own live name answers 409
                holders = [t.name for t in self.tenants
                           if t is not tenant and (name in t.current or name in t.busy_names)]
                self.stats.violation("namespace" if holders else "lost_ack", (tenant.name, name, "create"),
                                     op="create", tenant=tenant.name, memory=name, holders=holders)
        time.sleep(1.0)

    def delete_memory(self, tenant: Tenant, name: str) -> bool:
        incarnation = tenant.current[name]
        status, _ = self.call("delete_memory", "DELETE", f"/v1/memories/{name}", tenant.key)
        with tenant.lock:
            if status == 200 and tenant.current.get(name) is incarnation:
                incarnation.exists = False
                del tenant.current[name]
            elif status is None or status >= 500:
                incarnation.exists = None
        return status == 200

    def pick(self, tenant: Tenant, rng: random.Random) -> Incarnation | None:
        with tenant.lock:
            live = [inc for inc in tenant.current.values() if inc.exists]
        return rng.choice(live) if live else None

    def add(self, tenant: Tenant, rng: random.Random) -> None:
        """5-60 documents with explicit ids; a partial answer lists the stored ones."""
        if (incarnation := self.pick(tenant, rng)) is None:
            return
        with tenant.lock:
            first, incarnation.serial = incarnation.serial + 1, incarnation.serial + rng.randint(5, 60)
            ids = [f"{tenant.name}.{incarnation.name}.i{incarnation.number}.d{n}"
                   for n in range(first, incarnation.serial + 1)]
            incarnation.pending.update(ids)
        documents = [{"doc_id": doc_id, "text": document_text(rng, incarnation, doc_id)} for doc_id in ids]
        status, payload = self.call("add", "POST", f"/v1/memories/{incarnation.name}/documents", tenant.key,
                                    {"documents": documents})
        with tenant.lock:
            incarnation.pending.difference_update(ids)
            if status is None or status >= 500:  # maybe stored, maybe not
                incarnation.uncertain.update(ids)
            else:
                incarnation.present |= {d["doc_id"] for d in payload.get("documents", [])} & set(ids)

    def delete_doc(self, tenant: Tenant, rng: random.Random) -> None:
        incarnation = self.pick(tenant, rng)
        with tenant.lock:
            if incarnation is None or not incarnation.present:
                return
            doc_id = rng.choice(sorted(incarnation.present))
            incarnation.present.discard(doc_id)
            incarnation.pending.add(doc_id)
        status, _ = self.call("delete_doc", "DELETE", f"/v1/memories/{incarnation.name}/documents/{doc_id}",
                              tenant.key)
        with tenant.lock:
            incarnation.pending.discard(doc_id)
            target = incarnation.deleted if status == 200 else incarnation.present
            target = incarnation.uncertain if status is None or status >= 500 else target  # maybe deleted
            target.add(doc_id)

    def query(self, tenant: Tenant, rng: random.Random) -> None:
        """A chat over a memory: every retrieved document must be one this tenant's memory may hold."""
        if (incarnation := self.pick(tenant, rng)) is None:
            return
        with tenant.lock:
            allowed = incarnation.may_hold()
        question = {"role": "user", "content": f"Where is the {rng.choice(WORDS)}?"}
        body = {"messages": [question], "max_tokens": 4, "msa": {"routing_details": True}}
        status, payload = self.call("query", "POST", f"/v1/memories/{incarnation.name}/chat/completions",
                                    tenant.key, body)
        with tenant.lock:  # deleted and created again meanwhile: either life's documents may answer
            allowed |= incarnation.may_hold() | tenant.current.get(incarnation.name, incarnation).may_hold()
        retrieved = payload.get("msa", {}).get("retrieved", []) if status == 200 else []
        for doc_id in (doc["doc_id"] for doc in retrieved):
            if doc_id not in allowed:
                self.stats.violation("ghost" if doc_id.startswith(f"{tenant.name}.") else "cross_tenant",
                                     (tenant.name, incarnation.name, doc_id), op="query", tenant=tenant.name,
                                     memory=incarnation.name, incarnation=incarnation.number, doc_id=doc_id)

    def hostile(self, tenant: Tenant, rng: random.Random) -> None:
        """SGLang's own endpoints: a dropped generate (SGLang aborts by rid prefix) or an abort of all;
        or the tenant's own streaming chat, dropped after its first chunk (the server aborts it)."""
        actions = {**HOSTILE, **({"abort_admin": ADMIN_ABORT_WEIGHT} if self.args.admin_aborts else {})}
        action = rng.choices(list(actions), weights=list(actions.values()))[0]
        if action == "hostile_generate":  # the client times out after 0.5 s and closes the connection
            self.call(action, "POST", "/generate", body={"text": "hello", "rid": "msa-", "sampling_params": {
                "max_new_tokens": 1500, "ignore_eos": True}}, timeout=0.5)
            return
        if action == "abort_own":
            self.drop_own_stream(tenant, rng)
            return
        key = {"abort_nokey": None, "abort_tenant": tenant.key, "abort_admin": self.admin_key}[action]
        status, _ = self.call(action, "POST", "/abort_request", key, {"abort_all": True}, timeout=30)
        if action != "abort_admin" and status is not None and status < 400:
            self.stats.violation("admin_open", op=action, tenant=tenant.name, status=status)

    def drop_own_stream(self, tenant: Tenant, rng: random.Random) -> None:
        """A streaming chat over one of the tenant's memories, closed after its first chunk."""
        if (incarnation := self.pick(tenant, rng)) is None:
            return
        self.gate.wait()
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 64, "stream": True}
        began = time.perf_counter()
        try:
            with requests.post(f"{self.servers[-1].base_url}/v1/memories/{incarnation.name}/chat/completions",
                               json=body, headers={"Authorization": f"Bearer {tenant.key}"}, stream=True,
                               timeout=TIMEOUT_S) as response:
                status = response.status_code
                next(response.iter_lines(), None)
        except requests.RequestException:
            status = None
        with self.stats.lock:
            self.stats.latencies["abort_own"].append(time.perf_counter() - began)
            self.stats.statuses["abort_own"][str(status)] += 1
            if status is not None and status >= 500:
                self.stats.server_errors["POST /v1/memories/{id}/chat/completions (stream)"] += 1
        if status is not None and status >= 500:
            self.stats.violation("http_5xx", endpoint="chat/completions (stream)", status=status)

    def check(self, phase: str) -> None:
        """Every tenant's memories against the ledger (workers paused); settles what was uncertain."""
        if self.call("check", "GET", "/health", timeout=30, gated=False)[0] != 200:
            self.stats.violation("scheduler_dead", phase=phase, detail="/health does not answer")
            return
        for tenant in self.tenants:
            with tenant.lock:
                for name in NAMES:
                    self.check_memory(tenant, name, {"phase": phase, "tenant": tenant.name, "memory": name})

    def check_memory(self, tenant: Tenant, name: str, where: dict) -> None:
        """The listing equals the ledger, the scheduler holds as many documents, each one is this life's."""
        incarnation = tenant.current.get(name)
        status, info = self.call("check", "GET", f"/v1/memories/{name}", tenant.key, gated=False)
        if status != 200:
            if status == 403:
                self.stats.violation("namespace", (tenant.name, name, "exists"), **where,
                                     detail="another tenant's memory answers 403, not 404")
            if incarnation is not None:
                if incarnation.exists:
                    self.stats.violation("lost_ack", (tenant.name, name), **where, detail=f"memory: {status}")
                incarnation.exists = False
                del tenant.current[name]
            return
        if incarnation is None:
            others = any(name in t.current for t in self.tenants if t is not tenant)
            self.stats.violation("cross_tenant" if others else "lost_ack", (tenant.name, name), **where,
                                 detail="a memory this tenant does not hold answers 200")
            incarnation = Incarnation(tenant.name, name, -1)
        incarnation.exists, listed = True, self.listing(tenant, name)
        if info.get("documents") != len(listed):
            self.stats.violation("ghost", (tenant.name, name, where["phase"]), **where,
                                 scheduler=info.get("documents"), listed=len(listed))
        for doc_id in sorted(incarnation.present - incarnation.uncertain - listed):
            self.stats.violation("lost_ack", (tenant.name, name, doc_id), **where, doc_id=doc_id,
                                 detail="acknowledged document missing")
        for doc_id in sorted(listed):
            self.check_document(tenant, incarnation, doc_id, {**where, "doc_id": doc_id})
        incarnation.present = (incarnation.present | incarnation.uncertain) & listed
        incarnation.uncertain.clear()

    def check_document(self, tenant: Tenant, incarnation: Incarnation, doc_id: str, where: dict) -> None:
        """Its text names this tenant, memory, incarnation and id, and the ledger allows it."""
        status, doc = self.call("check", "GET", f"/v1/memories/{incarnation.name}/documents/{doc_id}",
                                tenant.key, gated=False)
        header = HEADER.match(doc.get("text", "")) if status == 200 else None
        key, text = (tenant.name, incarnation.name, doc_id), doc.get("text", "")[:80]
        if header is not None and header.group(1) != tenant.name:
            self.stats.violation("cross_tenant", key, **where, text=text)
        elif header is None or header.groups() != (tenant.name, incarnation.name, str(incarnation.number),
                                                   doc_id):
            self.stats.violation("ghost", key, **where, text=text, detail="another life's, or unreadable")
        elif doc_id in incarnation.deleted:
            self.stats.violation("lost_ack", key, **where, detail="acknowledged deletion came back")
        elif doc_id not in incarnation.may_hold():
            self.stats.violation("ghost", key, **where, detail="refused or failed addition is listed")

    def listing(self, tenant: Tenant, name: str) -> set[str]:
        listed: set[str] = set()
        while True:
            path = f"/v1/memories/{name}/documents?limit=100&offset={len(listed)}"
            status, page = self.call("check", "GET", path, tenant.key, gated=False)
            ids = {d["doc_id"] for d in page.get("documents", [])} if status == 200 else set()
            listed |= ids
            if len(ids) < 100:
                return listed

    def alive(self) -> bool:
        """A final query over some live memory (a plain /generate if none) answers."""
        live = [(t, name) for t in self.tenants for name, inc in t.current.items() if inc.exists]
        if not live:
            body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
            return self.call("final", "POST", "/generate", body=body)[0] == 200
        (tenant, name), question = live[0], {"role": "user", "content": "Still there?"}
        body = {"messages": [question], "max_tokens": 2}
        return self.call("final", "POST", f"/v1/memories/{name}/chat/completions", tenant.key, body)[0] == 200


def document_text(rng: random.Random, incarnation: Incarnation, doc_id: str) -> str:
    """~100-150 tokens for the tiny model's tokenizer, headed by its owner, incarnation and id."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 20)))
    return f"[{incarnation.tenant} {incarnation.name} incarnation {incarnation.number} doc {doc_id}] {words}."


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else None


def report(soak: Soak, load_s: float, timings: dict, out: Path) -> None:
    stats = soak.stats
    operations = {kind: {"count": len(values), "per_s": len(values) / load_s,
                         "p50_s": percentile(values, 0.5), "p99_s": percentile(values, 0.99),
                         "statuses": dict(stats.statuses[kind])}
                  for kind, values in sorted(stats.latencies.items())}
    print(f"\n{'operation':>16} {'count':>6} {'per s':>6} {'p50 s':>7} {'p99 s':>7}  statuses")
    for kind, row in operations.items():
        print(f"{kind:>16} {row['count']:>6} {row['per_s']:>6.2f} {row['p50_s']:>7.3f} {row['p99_s']:>7.3f}  "
              f"{row['statuses']}")
    print(f"\n{'violation':>16} {'count':>6} {'seen':>6}")
    for kind in KINDS:
        print(f"{kind:>16} {stats.violations[kind]:>6} {stats.occurrences[kind]:>6}")
    ledger = {t.name: {"incarnations": len(t.history),
                       "acknowledged_additions": sum(len(i.present | i.deleted) for i in t.history),
                       "acknowledged_deletions": sum(len(i.deleted) for i in t.history)}
              for t in soak.tenants}
    print(f"5xx by endpoint: {dict(stats.server_errors)}\nledger: {ledger}\nanswers >= 400 (count, message):")
    print("\n".join(f"{count:>6}  {message}" for message, count in stats.errors.most_common(15)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tenant_soak.json").write_text(json.dumps({
        "command": shlex.join(["SGLANG_USE_CPU_ENGINE=1", *sys.orig_argv]), "args": vars(soak.args),
        "server_args": ["<admin key>" if a == soak.admin_key else a for a in soak.server_args],
        "work_dir": str(soak.work), "load_s": load_s, "timings_s": timings, "operations": operations,
        "violations": {kind: stats.violations[kind] for kind in KINDS},
        "occurrences": {kind: stats.occurrences[kind] for kind in KINDS},
        "http_5xx_by_endpoint": stats.server_errors, "ledger": ledger, "errors": stats.errors,
        "violation_details": stats.details},
        indent=2))
    print(f"wrote {out / 'tenant_soak.json'} (server logs in {soak.work})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (the kill at half)")
    parser.add_argument("--out", default="benchmarks/results", help="directory of tenant_soak.json")
    parser.add_argument("--model", help="model directory (default: a tiny random Llama)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tenants-threads", type=int, default=2, help="worker threads per tenant")
    parser.add_argument("--admin-aborts", action="store_true",
                        help="the admin also aborts every request now and then (the requests it aborts answer 503)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tenant-soak-"))
    model = Path(args.model) if args.model else build_tiny_model("llama", work / "tiny-llama", seed=args.seed)
    soak = Soak(args, work, model)
    timings = {"start": soak.start()}
    soak.gate.set()
    began = time.monotonic()
    threads = [threading.Thread(target=soak.worker, args=(tenant, args.seed * 1000 + 10 * t + i), daemon=True)
               for t, tenant in enumerate(soak.tenants) for i in range(args.tenants_threads)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(args.duration / 2)
        timings["restart"] = soak.kill_and_restart()
        check_began = time.monotonic()
        soak.check("after_restart")
        timings["check_after_restart"] = time.monotonic() - check_began
        soak.gate.set()
        time.sleep(args.duration / 2)  # load time: the restart and its check do not count
        soak.stop.set()
        for thread in threads:
            thread.join(timeout=TIMEOUT_S + 10)
        load_s = time.monotonic() - began - timings["restart"] - timings["check_after_restart"]
        soak.check("final")
        if not soak.alive():
            soak.stats.violation("scheduler_dead", phase="final", detail="the final query did not answer")
    finally:
        soak.stop.set()
        soak.servers[-1].stop()
    report(soak, load_s, timings, Path(args.out))


if __name__ == "__main__":
    main()
