"""A cluster node in a process of its own, for tests that kill it with SIGKILL.

    python node_proc.py ENDPOINT PREFIX HOME NAME TTL

It joins (membership and election, no server) and prints one JSON line per event on
stdout: ``{"event": "joined", "lease": N}``, then ``{"event": "leader"}`` if it leads.
Then it runs until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from cachemesh.cluster import Election, EtcdKV, Keys, Membership


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


async def main(endpoint: str, prefix: str, home: str, name: str, ttl: str) -> None:
    kv = EtcdKV([endpoint], timeout=2.0)
    membership = Membership(kv, home=Path(home), name=name, advertise="http://127.0.0.1:1",
                            lease_ttl_s=int(ttl), keys=Keys(prefix))
    await membership.start()
    say(event="joined", lease=membership.lease, node_id=membership.node_id)
    election = Election(membership)
    election.start()
    await election.wait_leader(True)
    say(event="leader")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
