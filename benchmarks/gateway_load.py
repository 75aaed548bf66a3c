"""Device gateway under load: N simulated devices enroll and check in concurrently.

A bounded, self-stopping run over loopback: the gateway runs in its own process (so its
peak RSS is its own); one asyncio client process opens ``--channels`` gRPC channels and
drives ``--devices`` concurrent devices, each enrolling once and checking in
``--check-ins`` times. Prints p50/p99 latency of Enroll and CheckIn and the gateway's
peak RSS, as JSON.

    nice -n 19 .venv/bin/python benchmarks/gateway_load.py --devices 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from pathlib import Path

TOKEN = "load-test-token"


def serve(port_queue: multiprocessing.Queue, stop: multiprocessing.Event, devices: int) -> None:
    from fedtune.config import GatewayConfig
    from fedtune.server.gateway import Gateway, GatewaySettings

    config = GatewayConfig(enabled=True, port=0, token=TOKEN, rate=1000.0, burst=1000, check_in_s=5)
    gateway = Gateway(GatewaySettings(config, tuple(range(devices))), None)
    port_queue.put(gateway.start())
    stop.wait(600)
    gateway.stop(grace=0.5)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


async def drive(port: int, devices: int, check_ins: int, channels: int) -> dict[str, list[float]]:
    import grpc

    from fedtune.ondevice.proto import device_pb2 as pb
    from fedtune.ondevice.proto import device_pb2_grpc

    pool = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
    stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in pool]
    times: dict[str, list[float]] = {"enroll": [], "check_in": []}
    capabilities = pb.Capabilities(engines=["backprop", "zeroth"], runtimes=["onnxruntime"])

    async def device(i: int) -> None:
        stub = stubs[i % len(stubs)]
        started = time.perf_counter()
        reply = await stub.Enroll(
            pb.EnrollRequest(protocol_version=1, enrollment_token=TOKEN, device_name=f"d{i}"),
            timeout=120,
        )
        times["enroll"].append(time.perf_counter() - started)
        auth = (("authorization", f"Bearer {reply.device_id}:{reply.credential}"),)
        for _ in range(check_ins):
            started = time.perf_counter()
            await stub.CheckIn(
                pb.CheckInRequest(capabilities=capabilities), metadata=auth, timeout=120
            )
            times["check_in"].append(time.perf_counter() - started)

    await asyncio.gather(*(device(i) for i in range(devices)))
    for channel in pool:
        await channel.close()
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--check-ins", type=int, default=5)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(ports, stop, args.devices))
    server.start()
    try:
        port = ports.get(timeout=60)
        started = time.perf_counter()
        times = asyncio.run(drive(port, args.devices, args.check_ins, args.channels))
        wall = time.perf_counter() - started
        rss = peak_rss_mb(server.pid)
    finally:
        stop.set()
        server.join(30)
    result = {
        "devices": args.devices,
        "check_ins_per_device": args.check_ins,
        "wall_seconds": round(wall, 2),
        "calls_per_second": round((len(times["enroll"]) + len(times["check_in"])) / wall, 1),
        **{
            f"{name}_ms_p{int(q * 100)}": round(1000 * percentile(values, q), 2)
            for name, values in times.items()
            for q in (0.5, 0.99)
        },
        "gateway_peak_rss_mb": round(rss, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
