"""Before a change is acknowledged: wait until a synchronous passive copy holds it.

Delivery (before `250`) and the back end (before a QUIT's `+OK`) ask their own
server's replication service, which sees every passive copy's pulls, to wait until a
synchronous copy has confirmed the LSN of their change (replication/synchronous.py
says which copies are synchronous and when none is). They show this server's
replication certificate; the replication service takes this request from its own
server's services only.

A database with one copy waits for nothing. When the replication service cannot
answer, the change is on the active copy's disk but may be on no other: the caller
answers with a temporary failure (`451`, `-ERR`), never with success.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from popguard.directory.directory import Directory, Server
from popguard.directory.sql.engine import DIRECTORY_ERRORS

if TYPE_CHECKING:
    import httpx

# The replication service waits up to 3 s for a copy, then records in the directory
# that there is none: enough beyond that for a loaded host.
PATIENCE = 15.0


class SynchronousCopyWait:
    def __init__(
        self, server: Server, directory: Directory, client_tls: ssl.SSLContext, enabled: bool
    ) -> None:
        self.enabled = enabled
        self._directory = directory
        address = f"[{server.address}]" if ":" in server.address else server.address
        self._base_url = f"https://{address}:{server.port('replication')}/v1/"
        self._client_tls = client_tls
        self._client_made: httpx.AsyncClient | None = None

    @property
    def _client(self) -> httpx.AsyncClient:
        # httpx (with the rich and click its command line pulls in) is a tenth of a
        # second of every back end's and delivery worker's start: made on first use.
        if self._client_made is None:
            import httpx

            self._client_made = httpx.AsyncClient(
                base_url=self._base_url,
                verify=self._client_tls,
                timeout=httpx.Timeout(PATIENCE, connect=2.0),
            )
        return self._client_made

    async def held(self, database: str, lsn: int) -> str | None:
        """None once the change at `lsn` may be acknowledged; else why not."""
        if not self.enabled:
            return None
        try:
            if self._directory.copy_count(database) < 2:
                return None
        except DIRECTORY_ERRORS:
            pass  # the replication service knows its copies without the directory
        import httpx

        try:
            response = await self._client.post(
                f"databases/{database}/acknowledgement", json={"lsn": lsn}
            )
        except httpx.ConnectError as exc:
            return self._without_replication(database, exc)
        except httpx.HTTPError as exc:
            return f"the replication service did not answer: {exc or type(exc).__name__}"
        if response.status_code != 200:
            try:
                why = str(response.json().get("error", response.text))
            except ValueError:
                why = response.text or response.reason_phrase
            return f"no passive copy confirmed it: {why[:200]}"
        return None

    def _without_replication(self, database: str, error: Exception) -> str | None:
        """The replication service is not running: nothing can confirm the change, and
        it may be acknowledged only if the directory names no synchronous copy (which
        Active Manager would activate by itself, trusting it holds every change
        acknowledged). A dead process leaves no half-written mark behind."""
        try:
            marked = [c.server for c in self._directory.database_copies(database) if c.synchronous]
        except DIRECTORY_ERRORS as exc:
            return f"the replication service is down ({error}) and the directory too ({exc})"
        if not marked:
            return None
        return f"the replication service is down, and {', '.join(marked)} may lack the change"

    async def aclose(self) -> None:
        if self._client_made is not None:
            await self._client_made.aclose()
