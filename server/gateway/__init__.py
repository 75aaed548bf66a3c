"""The device gateway: phones join a run over fedtune's gRPC DeviceService.

Flower 1.41 talks to its nodes in signed protobuf over HTTP and its Android SDK targets
an API that no longer exists, so phones speak ``fedtune/ondevice/proto/device.proto`` to
this gateway instead. It runs on a grpcio asyncio server in a thread of the ServerApp,
and :class:`~fedtune.server.grid.GatewayGrid` makes every enrolled phone a node of the
grid the round loop sees: a strategy samples phones like Flower nodes, a train message
to a phone becomes a *task* the phone picks up at check-in, and its upload becomes a
Flower reply with the records a ClientApp sends, so the loop validates it the same way.

- :mod:`.settings` — limits and :class:`GatewaySettings` from a scenario;
- :mod:`.auth` — enrollment, credentials, rate limits;
- :mod:`.tasks` — tasks from push to reply; :mod:`.translate` — message <-> task;
- :mod:`.validate` — transport checks (content checks are :mod:`fedtune.wire`'s);
- :mod:`.core` — :class:`Gateway`, the bridge; :mod:`.service` — gRPC, hosting.
"""

from fedtune.server.gateway.core import Gateway
from fedtune.server.gateway.service import GatewayServer, hosted_gateway
from fedtune.server.gateway.settings import GatewayAbort, GatewaySettings, settings_for

__all__ = [
    "Gateway",
    "GatewayAbort",
    "GatewayServer",
    "GatewaySettings",
    "hosted_gateway",
    "settings_for",
]
