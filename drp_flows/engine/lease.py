"""One campaign, one runner: a lease in the campaign site's registry.

Two `drp campaign r1` (or a rescue, a deployment run and a re-run) at once would process the
same CCDs twice and write the same files concurrently. Whoever runs a campaign first
registers the collection `<instrument>/leases/<campaign>` (the registry makes one of two
concurrent registrations win), its documentation saying who holds it (host, process, Prefect
flow run, start) and when it last said it was alive; a thread renews that every `beat`
seconds and the collection is removed when the run ends. A second runner is refused with
an error naming the holder, unless the holder is dead: a process of this host that no longer
exists, or a heartbeat older than `stale` seconds (a holder on another host, or one killed
without a word); then the lease is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime

from lsst.daf.butler import Butler, CollectionType, MissingCollectionError

from drp_flows.errors import InputError
from drp_flows.tasks.camera import INSTRUMENT

log = logging.getLogger(__name__)
LEASES = f"{INSTRUMENT}/leases/"
BEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class CampaignBusy(InputError):
    """The campaign is being run by someone else; the message names who."""


def _alive(holder: dict, stale: float) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:          # someone else's process: it exists
            pass
        return True
    return time.time() - float(holder.get("beat", 0)) < stale


class CampaignLease:
    """Hold a campaign's lease for the length of a `with` block (see the module)."""

    def __init__(self, butler: Butler, campaign: str, flow_run: str = "",
                 beat: float = BEAT_SECONDS, stale: float = STALE_SECONDS):
        self.butler, self.campaign, self.beat, self.stale = butler, campaign, beat, stale
        self.name = LEASES + campaign
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "flow_run": flow_run,
                       "started": datetime.now(UTC).isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> str:
        return json.dumps(self.holder | {"beat": time.time()})

    def __enter__(self) -> CampaignLease:
        registry = self.butler.registry
        for _ in range(3):
            if registry.registerCollection(self.name, CollectionType.TAGGED, doc=self._doc()):
                break
            try:
                holder = json.loads(registry.getCollectionDocumentation(self.name) or "{}")
            except MissingCollectionError:       # released between the two calls: again
                continue
            if _alive(holder, self.stale):
                age = time.time() - float(holder.get("beat", 0))
                raise CampaignBusy(
                    f"campaign {self.campaign} is being run by process {holder.get('pid')} on "
                    f"{holder.get('host')} (flow run {holder.get('flow_run') or '-'}, since "
                    f"{holder.get('started')}, alive {age:.0f} s ago): wait for it to end, or "
                    f"stop it; a holder that died is replaced once its heartbeat is "
                    f"{self.stale:.0f} s old")
            registry.removeCollection(self.name)         # its holder died: take it over
        else:
            raise CampaignBusy(f"campaign {self.campaign}: its lease changed hands three times "
                               "while this run tried to take it")
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.campaign}",
                                        daemon=True)
        self._thread.start()
        return self

    def _ours(self) -> bool:
        try:
            holder = json.loads(self.butler.registry.getCollectionDocumentation(self.name) or "{}")
        except MissingCollectionError:
            return False
        return all(holder.get(k) == v for k, v in self.holder.items())

    def _renew(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                if not self._ours():
                    log.warning("the lease of campaign %s was taken over: this run's heartbeat "
                                "had stopped for %.0f s", self.campaign, self.stale)
                    return
                self.butler.registry.setCollectionDocumentation(self.name, self._doc())
            except Exception as e:  # noqa: BLE001 (a missed beat only ages the lease)
                log.warning("campaign %s: its lease's heartbeat failed (%s); trying again in "
                            "%.0f s", self.campaign, e, self.beat)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.beat + 10)
        if self._ours():                 # never someone else's, that took a stale lease over
            self.butler.registry.removeCollection(self.name)
