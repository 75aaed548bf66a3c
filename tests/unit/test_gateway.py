"""The device gateway on a real gRPC server over loopback, with the reference client.

Bad input gets its status code and ErrorDetail, and touches nothing else: the round
loop sees a bad update as an error reply with a reason, the other phones' tasks go on.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress

import grpc
import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune.clients.device import DeviceClient, DeviceError, error_of
from fedtune.config import GatewayConfig, LoraConfig, client_spec, load_scenario
from fedtune.data.sources import load_shakespeare
from fedtune.engines.seeds import replay, seed_pool
from fedtune.ondevice.artifacts import build_artifacts
from fedtune.ondevice.engines import chunk_text, train_zeroth
from fedtune.ondevice.proto import device_pb2 as pb
from fedtune.ondevice.proto.tensors import from_bundle, to_bundle
from fedtune.protocol import ARRAYS_KEY, CONFIG_KEY, DECLINED_REPLY_CODE
from fedtune.server.gateway import Gateway, GatewaySettings
from fedtune.server.grid import DeviceGrid, GatewayGrid
from fedtune.wire import check_seed_reply, check_update, expected_specs, to_record

from .node_grid import NodeListGrid, task_identity

TOKEN = "enrol-me-please"
LORA = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture(autouse=True)
def _flower_task():
    with task_identity():  # Flower builds Messages only inside a task
        yield


@pytest.fixture(scope="module")
def artifacts():
    return build_artifacts("tiny-llama", 0, LORA)


@pytest.fixture(scope="module")
def adapter():
    from fedtune.models import adapter_state, attach_lora, load_base_model

    return adapter_state(attach_lora(load_base_model("tiny-llama"), LORA, seed=0))


@pytest.fixture(scope="module")
def text():
    return "\n".join(c.text for c in load_shakespeare()[:3])[:6000]


def start(artifacts, **overrides):
    settings = {"max_chunk_kb": 64, "rate": 200.0, "burst": 200, "token": TOKEN, **overrides}
    config = GatewayConfig(enabled=True, port=0, **settings)
    gateway = Gateway(GatewaySettings(config, client_indices=(0, 1, 2)), artifacts)
    gateway.start()
    return gateway


@pytest.fixture()
def gateway(artifacts):
    gw = start(artifacts)
    yield gw
    gw.stop(grace=0.1)


def device(gateway, tmp_path, name="a", certs=None):
    return DeviceClient(
        f"127.0.0.1:{gateway.port}", TOKEN, tmp_path / f"dev-{name}", certs, name=name
    )


def train_message(node_id, adapter, rnd=1, *settings):
    scenario = load_scenario("tiny", ["client.local_steps=2", "client.batch_size=2", *settings])
    config = ConfigRecord({**client_spec(scenario), "round": rnd})
    return Message(
        RecordDict({ARRAYS_KEY: to_record(adapter), CONFIG_KEY: config}),
        dst_node_id=node_id,
        message_type=MessageType.TRAIN,
    )


def enrolled(gateway, tmp_path, names=("a",)):
    clients = [device(gateway, tmp_path, n) for n in names]
    for c in clients:
        c.enroll()
    return clients


def node_of(gateway, client):
    return gateway.devices[client.device_id].node_id


def status_and_code(excinfo):
    exc = excinfo.value
    if isinstance(exc, grpc.RpcError):
        exc = error_of(exc)
    return exc.code, exc.detail.code


def test_wrong_enrollment_token_and_wrong_credential_are_unauthenticated(gateway, tmp_path):
    stranger = DeviceClient(f"127.0.0.1:{gateway.port}", "not-the-token", tmp_path / "s")
    with pytest.raises(DeviceError) as excinfo:
        stranger.enroll()
    assert status_and_code(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, pb.BAD_ENROLLMENT_TOKEN)

    (phone,) = enrolled(gateway, tmp_path)
    assert phone.check_in().WhichOneof("outcome") == "wait"
    phone.credential = "forged"
    with pytest.raises(DeviceError) as excinfo:
        phone.check_in()
    assert status_and_code(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, pb.BAD_CREDENTIAL)
    phone.device_id = "unknown-device"
    with pytest.raises(DeviceError) as excinfo:
        phone.fetch(pb.ArtifactRef(name="x", artifact_id="00"))
    assert status_and_code(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, pb.BAD_CREDENTIAL)


def test_phones_are_nodes_of_the_device_grid_and_train(gateway, tmp_path, adapter, text):
    phones = enrolled(gateway, tmp_path, ("a", "b"))
    grid = DeviceGrid(GatewayGrid(NodeListGrid([]), gateway))
    found = grid.discover(expected=2, population=3, timeout=5)
    assert sorted(info.client_index for info in found.values()) == [0, 1]

    messages = [train_message(node_of(gateway, p), adapter) for p in phones]
    ids = list(grid.push_messages(messages))
    for phone in phones:
        task = phone.check_in().task
        assert task.round == 1 and task.config.engine == "backprop"
        assert phone.run_task(task, text).accepted
    replies = dict(grid.pull_replies(ids))
    assert set(replies) == set(ids)
    for reply in replies.values():
        state, reason = check_update(reply, expected_specs(adapter), 1 << 24)
        assert reason is None
        assert any(not np.array_equal(state[k], adapter[k]) for k in adapter)
    # The task is done: the next check-in has nothing.
    assert phones[0].check_in().WhichOneof("outcome") == "wait"


def test_a_zeroth_phone_uploads_seed_steps_that_replay_to_its_adapter(
    gateway, tmp_path, adapter, text
):
    (phone,) = enrolled(gateway, tmp_path)
    message = train_message(
        node_of(gateway, phone), adapter, 1, "client.engine=zeroth", "client.num_seeds=64"
    )
    message_id = gateway.push(message)
    task = phone.check_in().task
    assert task.config.engine == "zeroth"
    assert {a.name for a in task.artifacts} == {"inference_model", "tokenizer", "adapter"}
    paths = {ref.name: phone.fetch(ref) for ref in task.artifacts}
    start = from_bundle(paths["adapter"].read_bytes())
    chunks = chunk_text(paths["tokenizer"], text, task.config.seq_len)
    result = train_zeroth(paths, start, list(task.adapter), chunks, task.config)
    metrics = pb.UpdateMetrics(num_examples=result.num_examples, loss=result.losses[0])
    assert phone.submit(task, {}, metrics, steps=result.steps).accepted
    ((_, reply),) = gateway.pull([message_id])
    steps, reason = check_seed_reply(reply, 64, 2)
    assert reason is None and steps == result.steps
    lr = message.content.config_records[CONFIG_KEY]["client.lr"]
    replayed = replay(adapter, steps, seed_pool(0, 64), lr)
    for key in adapter:  # the server's replay gives the phone's adapter bit for bit
        assert np.array_equal(replayed[key].numpy(), result.arrays[key]), key


def test_seed_catch_up_is_replayed_by_the_gateway_and_checked(gateway, tmp_path, adapter):
    import torch

    from fedtune.engines.seeds import adapter_digest
    from fedtune.protocol import CATCH_UP_KEY, DIGEST_KEY, SEEDS_KEY, VERSION_KEY
    from fedtune.wire import seeds_to_record

    (phone,) = enrolled(gateway, tmp_path)
    node = node_of(gateway, phone)
    first = train_message(node, adapter, 1, "client.engine=zeroth", "client.num_seeds=64")
    first.content[CONFIG_KEY] = ConfigRecord({**first.content[CONFIG_KEY], VERSION_KEY: 3})
    gateway.push(first)
    steps = [(5, 0.25), (17, -1.5)]
    lr = first.content[CONFIG_KEY]["client.lr"]
    current = replay(adapter, steps, seed_pool(0, 64), lr)

    def catch_up(digest):
        message = train_message(node, adapter, 2, "client.engine=zeroth", "client.num_seeds=64")
        del message.content[ARRAYS_KEY]
        message.content[SEEDS_KEY] = seeds_to_record(steps)
        config = {**message.content[CONFIG_KEY], VERSION_KEY: 4, CATCH_UP_KEY: 3}
        message.content[CONFIG_KEY] = ConfigRecord({**config, DIGEST_KEY: digest})
        return gateway.push(message)

    refused = catch_up("not-the-digest")
    ((_, reply),) = gateway.pull([refused])
    assert reply.has_error() and "differs from the server's" in reply.error.reason
    catch_up(adapter_digest(current))
    task = phone.check_in().task
    assert task.round == 2
    ref = next(a for a in task.artifacts if a.name == "adapter")
    sent = from_bundle(phone.fetch(ref).read_bytes())
    assert all(torch.equal(torch.from_numpy(sent[k]), current[k]) for k in current)


def test_a_repeated_submit_with_the_same_key_is_accepted_once(gateway, tmp_path, adapter):
    (phone,) = enrolled(gateway, tmp_path)
    message_id = gateway.push(train_message(node_of(gateway, phone), adapter))
    task = phone.check_in().task
    arrays = {k: v.numpy() + 0.01 for k, v in adapter.items()}
    metrics = pb.UpdateMetrics(num_examples=4, loss=3.0)
    first = phone.submit(task, arrays, metrics, key="key-1")
    again = phone.submit(task, arrays, metrics, key="key-1")
    assert (first.accepted, first.duplicate) == (True, False)
    assert (again.accepted, again.duplicate) == (True, True)
    assert len(gateway.pull([message_id])) == 1
    assert gateway.pull([message_id]) == []
    with pytest.raises(DeviceError) as excinfo:
        phone.submit(task, arrays, metrics, key="key-2")
    assert status_and_code(excinfo) == (grpc.StatusCode.FAILED_PRECONDITION, pb.TASK_CLOSED)
    # The same key with other content is refused, not answered "duplicate".
    other = {k: v + 1.0 for k, v in arrays.items()}
    with pytest.raises(DeviceError) as excinfo:
        phone.submit(task, other, metrics, key="key-1")
    assert status_and_code(excinfo) == (grpc.StatusCode.ALREADY_EXISTS, pb.KEY_REUSED)


def test_a_wrong_round_leaves_the_task_open_and_a_decline_closes_it_at_once(
    gateway, tmp_path, adapter
):
    (phone,) = enrolled(gateway, tmp_path)
    message_id = gateway.push(train_message(node_of(gateway, phone), adapter, 3))
    task = phone.check_in().task
    arrays = {k: v.numpy() for k, v in adapter.items()}
    stale = pb.Task()
    stale.CopyFrom(task)
    stale.round = 2
    with pytest.raises(DeviceError) as excinfo:
        phone.submit(stale, arrays, pb.UpdateMetrics(num_examples=4, loss=1.0))
    assert status_and_code(excinfo) == (grpc.StatusCode.INVALID_ARGUMENT, pb.WRONG_ROUND)
    assert phone.check_in().task.task_id == task.task_id  # still open: not TASK_CLOSED
    phone.decline(task, "battery low\nINFO: forged log line")
    ((_, reply),) = gateway.pull([message_id])
    assert reply.has_error() and reply.error.code == DECLINED_REPLY_CODE
    assert "battery low?INFO" in reply.error.reason  # the newline cannot forge a log line
    assert phone.check_in().WhichOneof("outcome") == "wait"
    with pytest.raises(DeviceError) as excinfo:
        phone.decline(task, "again")
    assert status_and_code(excinfo) == (grpc.StatusCode.FAILED_PRECONDITION, pb.TASK_CLOSED)


def test_device_names_are_made_printable(gateway, tmp_path):
    (phone,) = enrolled(gateway, tmp_path, ("evil\nINFO: admin enrolled\x1b[2J",))
    (device,) = gateway.devices.values()
    assert device.name == "evil?INFO: admin enrolled?[2J" and device.name.isprintable()


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda a, k: a.__setitem__(k, np.full_like(a[k], np.nan)), "non-finite"),
        (lambda a, k: a.__setitem__(k, np.zeros((3, 3), np.float32)), "shape"),
        (lambda a, k: a.pop(k), "missing"),
    ],
    ids=["nan", "wrong-shape", "missing-tensor"],
)
def test_a_bad_update_is_rejected_with_a_reason_and_others_go_on(
    gateway, tmp_path, adapter, corrupt, reason
):
    bad, good = enrolled(gateway, tmp_path, ("bad", "good"))
    ids = {p.name: gateway.push(train_message(node_of(gateway, p), adapter)) for p in (bad, good)}
    arrays = {k: v.numpy().copy() for k, v in adapter.items()}
    corrupt(arrays, sorted(arrays)[0])
    bad_task = bad.check_in().task
    with pytest.raises(DeviceError) as excinfo:
        bad.submit(bad_task, arrays, pb.UpdateMetrics(num_examples=4, loss=1.0))
    assert status_and_code(excinfo) == (grpc.StatusCode.INVALID_ARGUMENT, pb.BAD_UPDATE)
    assert reason in str(excinfo.value)
    ((_, rejected),) = gateway.pull([ids["bad"]])
    state, why = check_update(rejected, expected_specs(adapter), 1 << 24)
    assert state is None and reason in why

    fine = {k: v.numpy() for k, v in adapter.items()}
    answer = good.submit(good.check_in().task, fine, pb.UpdateMetrics(num_examples=4, loss=1.0))
    assert answer.accepted
    ((_, accepted),) = gateway.pull([ids["good"]])
    assert check_update(accepted, expected_specs(adapter), 1 << 24)[1] is None


def raw_upload(phone, header, chunks):
    def stream():
        yield pb.UpdateChunk(header=header)
        for data in chunks:
            yield pb.UpdateChunk(data=data)

    with pytest.raises(grpc.RpcError) as excinfo:
        phone.stub.SubmitUpdate(stream(), metadata=phone.auth, timeout=30)
    return excinfo


def test_oversized_chunks_and_updates_are_resource_exhausted(gateway, tmp_path, adapter):
    (phone,) = enrolled(gateway, tmp_path)
    gateway.push(train_message(node_of(gateway, phone), adapter))
    task = phone.check_in().task
    limit = 64 * 1024
    header = pb.UpdateHeader(
        task_id=task.task_id, round=task.round, idempotency_key="k", total_size=limit + 1
    )
    excinfo = raw_upload(phone, header, [b"\0" * (limit + 1)])  # over the gateway's limit
    assert status_and_code(excinfo) == (grpc.StatusCode.RESOURCE_EXHAUSTED, pb.TOO_LARGE)
    excinfo = raw_upload(phone, header, [b"\0" * (4 * limit)])  # over gRPC's message limit
    assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    header.total_size = 1 << 30
    excinfo = raw_upload(phone, header, [])
    assert status_and_code(excinfo) == (grpc.StatusCode.RESOURCE_EXHAUSTED, pb.TOO_LARGE)
    # A payload whose checksum differs is refused, and the task stays open for a retry.
    payload = to_bundle({k: v.numpy() for k, v in adapter.items()})
    header = pb.UpdateHeader(
        task_id=task.task_id,
        round=task.round,
        idempotency_key="k",
        total_size=len(payload),
        sha256="0" * 64,
        metrics=pb.UpdateMetrics(num_examples=1, loss=1.0),
    )
    excinfo = raw_upload(phone, header, [payload])
    assert status_and_code(excinfo) == (grpc.StatusCode.INVALID_ARGUMENT, pb.CHECKSUM_MISMATCH)
    arrays = {k: v.numpy() for k, v in adapter.items()}
    assert phone.submit(task, arrays, pb.UpdateMetrics(num_examples=1, loss=1.0)).accepted


def test_a_device_over_its_rate_is_told_when_to_come_back(artifacts, tmp_path):
    gateway = start(artifacts, rate=0.5, burst=3)
    try:
        (phone,) = enrolled(gateway, tmp_path)
        for _ in range(3):
            phone.check_in()
        with pytest.raises(DeviceError) as excinfo:
            phone.check_in()
        assert status_and_code(excinfo) == (grpc.StatusCode.RESOURCE_EXHAUSTED, pb.RATE_LIMITED)
        assert excinfo.value.detail.retry_after_seconds >= 1
    finally:
        gateway.stop(grace=0.1)


def test_a_broken_download_resumes_from_its_offset(gateway, tmp_path, artifacts):
    (phone,) = enrolled(gateway, tmp_path)
    file = artifacts.file("checkpoint")
    ref = pb.ArtifactRef(name="checkpoint", artifact_id=file.sha256, size=file.size)
    part = phone.fetch(ref, stop_after=1)  # the link breaks after the first chunk
    assert part.suffix == ".part" and 0 < part.stat().st_size < file.size
    done = phone.fetch(ref)
    assert hashlib.sha256(done.read_bytes()).hexdigest() == file.sha256
    assert not part.exists()
    with pytest.raises(grpc.RpcError) as excinfo:
        list(
            phone.stub.GetArtifact(
                pb.GetArtifactRequest(artifact_id=file.sha256, offset=file.size + 1),
                metadata=phone.auth,
            )
        )
    assert status_and_code(excinfo) == (grpc.StatusCode.OUT_OF_RANGE, pb.BAD_OFFSET)
    with pytest.raises(DeviceError) as excinfo:
        phone.fetch(pb.ArtifactRef(name="x", artifact_id="ab" * 32))
    assert status_and_code(excinfo) == (grpc.StatusCode.NOT_FOUND, pb.UNKNOWN_ARTIFACT)


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "gateway.pem", tmp_path / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_gateway_takes_tls_clients_only(artifacts, tmp_path):
    cert, key = self_signed(tmp_path)
    gateway = start(artifacts, tls_certificate=str(cert), tls_private_key=str(key))
    try:
        phone = DeviceClient(
            f"localhost:{gateway.port}", TOKEN, tmp_path / "tls", cert.read_bytes()
        )
        phone.enroll()
        assert phone.check_in().WhichOneof("outcome") == "wait"
        plain = DeviceClient(
            f"localhost:{gateway.port}", TOKEN, tmp_path / "plain", connect_timeout=2
        )
        with pytest.raises(DeviceError) as excinfo:
            plain.enroll()  # no TLS handshake: the channel never becomes ready
        assert excinfo.value.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    finally:
        gateway.stop(grace=0.1)


def test_finished_run_tells_phones_to_stop(gateway, tmp_path, text):
    (phone,) = enrolled(gateway, tmp_path)
    gateway.finish()
    assert phone.check_in().WhichOneof("outcome") == "finished"
    assert phone.run(text) == 0


def test_the_gateway_section_is_checked_like_any_other():
    from fedtune.errors import ConfigError

    scenario = load_scenario("tiny", ["gateway.enabled=true", f"gateway.token={TOKEN}"])
    assert scenario.gateway.enabled and scenario.gateway.port == 9300
    with pytest.raises(ConfigError, match="gateway.prot.*did you mean 'gateway.port'"):
        load_scenario("tiny", ["gateway.prot=1"])
    with pytest.raises(ConfigError, match="gateway.token"):
        load_scenario("tiny", ["gateway.enabled=true"])
    with pytest.raises(ConfigError, match="tls_private_key"):
        load_scenario("tiny", ["gateway.tls_certificate=cert.pem"])


def test_a_newer_task_supersedes_and_old_ones_are_forgotten(gateway, tmp_path, adapter):
    (phone,) = enrolled(gateway, tmp_path)
    node = node_of(gateway, phone)
    gateway.push(train_message(node, adapter, 1))
    old = phone.check_in().task
    for rnd in (2, 3):
        gateway.push(train_message(node, adapter, rnd))
    assert phone.check_in().task.round == 3
    assert len(gateway.tasks.by_id) == 2  # the current task and the one before it
    arrays = {k: v.numpy() for k, v in adapter.items()}
    with pytest.raises(DeviceError) as excinfo:  # round 1's task is gone
        phone.submit(old, arrays, pb.UpdateMetrics(num_examples=1, loss=1.0))
    assert status_and_code(excinfo) == (grpc.StatusCode.NOT_FOUND, pb.UNKNOWN_TASK)


def test_dynamic_int8_artifacts_serve_zeroth_and_refuse_backprop(tmp_path, adapter):
    dynamic = build_artifacts("tiny-llama", 0, LORA, int8="dynamic")
    gateway = start(dynamic)
    try:
        (phone,) = enrolled(gateway, tmp_path)
        node = node_of(gateway, phone)
        refused = gateway.push(train_message(node, adapter, 1))  # backprop: no artifacts
        ((_, reply),) = gateway.pull([refused])
        assert reply.has_error() and "artifact_int8 = 'dynamic'" in reply.error.reason
        gateway.push(train_message(node, adapter, 1, "client.engine=zeroth"))
        task = phone.check_in().task
        assert task.config.engine == "zeroth"
        names = {a.name: a.artifact_id for a in task.artifacts}
        assert names["inference_model"] == dynamic.file("inference_model").sha256
    finally:
        gateway.stop(grace=0.1)


def test_a_phone_claiming_10_to_the_12_examples_gets_the_server_assigned_weight(
    gateway, tmp_path, adapter
):
    from fedtune.server import round as steps
    from fedtune.server.grid import NodeInfo
    from fedtune.strategies import build_strategy

    from .node_grid import federation

    (phone,) = enrolled(gateway, tmp_path)
    node = node_of(gateway, phone)
    message = train_message(node, adapter)  # tiny, local_steps=2 and batch_size=2
    scenario = load_scenario("tiny", ["client.local_steps=2", "client.batch_size=2"])
    fed = federation(build_strategy("fedavg", {}, 3, 1), scenario, {}, adapter=adapter)
    fed.grid = DeviceGrid(GatewayGrid(NodeListGrid([]), gateway))
    fed.grid.nodes = {node: NodeInfo(node, 0)}
    (assignment,) = steps.assign(fed, 1, [message], adapter)
    (message_id,) = fed.grid.push_messages([assignment.message])
    task = phone.check_in().task
    downloaded = sum(phone.fetch(ref).stat().st_size for ref in task.artifacts)
    arrays = {k: v.numpy() + 0.01 for k, v in adapter.items()}
    assert phone.submit(task, arrays, pb.UpdateMetrics(num_examples=10**12, loss=1.0)).accepted
    ((_, reply),) = fed.grid.pull_replies([message_id])
    judged = steps.judge(fed, 1, assignment, reply, adapter, 5.0)
    assert judged.event["status"] == "ok"
    assert (judged.event["num_examples"], judged.event["reported_num_examples"]) == (4, 10**12)
    assert reply.content["metrics"]["num-examples"] == 4  # what the strategy weights by
    # Bytes are what the phone moved (artifacts and adapter), counted by the gateway.
    uploaded = sum(v.nbytes for v in arrays.values())
    assert downloaded <= judged.event["bytes_down"] <= downloaded * 1.01 + 4096
    assert uploaded <= judged.event["bytes_up"] <= uploaded + 4096


def test_one_time_device_tokens_each_enroll_one_device(artifacts, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# one per phone\nphone-one-token\nphone-two-token\n")
    gateway = start(artifacts, token="", device_tokens=str(tokens))
    try:
        first = DeviceClient(f"127.0.0.1:{gateway.port}", "phone-one-token", tmp_path / "1")
        first.enroll()
        again = DeviceClient(f"127.0.0.1:{gateway.port}", "phone-one-token", tmp_path / "2")
        with pytest.raises(DeviceError) as excinfo:  # a leaked token costs one slot only
            again.enroll()
        assert status_and_code(excinfo) == (
            grpc.StatusCode.UNAUTHENTICATED,
            pb.BAD_ENROLLMENT_TOKEN,
        )
        DeviceClient(f"127.0.0.1:{gateway.port}", "phone-two-token", tmp_path / "3").enroll()
        assert len(gateway.devices) == 2
    finally:
        gateway.stop(grace=0.1)


# ------------------------------------------------------------- FwdLLM's probes on phones


def fwdllm_federation(gateway, phone, adapter, *settings):
    """A fwdllm federation whose one node is ``phone``, a round-1 step as its guide."""
    from fedtune.server.grid import NodeInfo
    from fedtune.strategies import build_strategy

    from .node_grid import federation

    scenario = load_scenario(
        "tiny",
        [
            "client.engine=forward",
            "client.num_seeds=64",
            "client.batch_size=2",
            "client.seq_len=16",  # short sequences: torch's references cost a quarter
            *settings,
        ],
    )
    strategy = build_strategy("fwdllm", {"probes": 4, "guide_sigmas": 1.0}, 3, 1)
    strategy.seed_history = [[(3, 0.5), (10, -0.25)]]  # last round's step: the guide
    fed = federation(strategy, scenario, {}, adapter=adapter)
    node = node_of(gateway, phone)
    fed.grid = DeviceGrid(GatewayGrid(NodeListGrid([]), gateway))
    fed.grid.nodes = {node: NodeInfo(node, 0)}
    return fed, scenario


def test_a_phone_forward_task_round_trip_through_the_gateway(gateway, tmp_path, adapter, text):
    """FwdLLM on a phone: the gateway picks the directions (discriminatively, from the
    guide) as a ClientApp of the same client would, the reference client takes two-point
    differences on the inference graph, and the server replays the probes as one step."""
    import torch

    from fedtune.clients.app import probe_settings
    from fedtune.engines import engine_settings
    from fedtune.engines.forward import ForwardEngine, directional_derivative
    from fedtune.engines.seeds import perturbation
    from fedtune.ondevice.engines import batch_order
    from fedtune.protocol import METRICS_KEY, TrainInstructions, TrainReport
    from fedtune.server import round as rounds

    (phone,) = enrolled(gateway, tmp_path)
    fed, scenario = fwdllm_federation(gateway, phone, adapter)
    (message,) = rounds.sample(fed, 2, adapter, client_spec(scenario))
    (assignment,) = rounds.assign(fed, 2, [message], adapter)
    (message_id,) = fed.grid.push_messages([assignment.message])
    task = phone.check_in().task
    config = task.config
    assert config.engine == "forward" and len(config.probe_indices) == 4
    assert {a.name for a in task.artifacts} == {"inference_model", "tokenizer", "adapter"}

    # The directions are those a ClientApp serving client 0 probes (same seed, same guide).
    from fedtune.models import attach_lora, load_adapter_state, load_base_model

    model = attach_lora(load_base_model("tiny-llama"), LORA, seed=0)
    load_adapter_state(model, adapter)
    asked = TrainInstructions.of(assignment.message)
    settings = engine_settings("forward", scenario, seed=asked.client_seed(0), train_only="all")
    paths = {ref.name: phone.fetch(ref) for ref in task.artifacts}
    chunks = chunk_text(paths["tokenizer"], text, config.seq_len)
    torch_probes = ForwardEngine().probe(
        model, torch.from_numpy(chunks), probe_settings(settings, asked, assignment.message)
    )
    assert [i for i, _ in torch_probes.seed_steps] == list(config.probe_indices)

    assert phone.run_task(task, text).accepted
    ((_, reply),) = fed.grid.pull_replies([message_id])
    steps, reason = check_seed_reply(reply, 64, 4)
    assert reason is None
    assert [i for i, _ in steps] == list(config.probe_indices)  # the indices sent, in order
    # Each derivative is torch's two-point difference at the same adapter and batch
    # (measured: within 1e-4; ORT and torch round the loss differently).
    pool = seed_pool(0, 64)
    specs = [(k, tuple(adapter[k].shape)) for k in sorted(adapter)]
    params = {n: p.detach() for n, p in sorted(model.named_parameters()) if "lora_" in n}
    batches = batch_order(len(chunks), config.batch_size, 4, config.seed)
    for (index, slope), batch in zip(steps, batches, strict=True):
        z = perturbation(pool[index], specs)
        tangent = {n: z[n.replace(".default.", ".")] for n in params}
        ids = torch.from_numpy(chunks[batch])
        _, fd = directional_derivative(model, params, tangent, ids, "fd", config.eps)
        assert slope == pytest.approx(fd, abs=2e-3)
    # Its metrics have a ClientApp's keys (Flower's FedAvg aggregates only equal keys).
    client_app = TrainReport(1, 1.0, 1.0, 1.0, 1.0, 0, 2, extra=torch_probes.metrics)
    assert set(reply.content[METRICS_KEY]) == set(client_app.to_metrics())

    # The server judges and replays it as any probing client's: one step along its mean.
    judged = rounds.judge(fed, 2, assignment, reply, adapter, 5.0)
    assert judged.event["status"] == "ok" and judged.event["num_examples"] == 4 * 2
    moved = replay(adapter, [(i, g / 4) for i, g in steps], pool, scenario.client.lr)
    assert all(torch.equal(judged.update[k], moved[k]) for k in adapter)
    assert any(not torch.equal(judged.update[k], adapter[k]) for k in adapter)
    # 8 bytes a probe plus the header's ids and metrics: a few hundred bytes up.
    adapter_bytes = sum(v.numel() * 4 for v in adapter.values())
    assert 4 * 8 < judged.event["bytes_up"] <= 320 < adapter_bytes / 20


def test_forward_tasks_go_only_to_probing_phones_and_other_indices_are_rejected(
    gateway, tmp_path, adapter
):
    from fedtune.checks import check_federation
    from fedtune.errors import ConfigError
    from fedtune.protocol import PROBES_KEY, traits_of
    from fedtune.server import round as rounds
    from fedtune.strategies import build_strategy

    old, probing = enrolled(gateway, tmp_path, ("old", "new"))
    # A phone that does not list "forward" (an older app) is never given such a task.
    gateway.devices[old.device_id].capabilities = pb.Capabilities(engines=["backprop", "zeroth"])
    fed, scenario = fwdllm_federation(gateway, old, adapter)
    (message,) = rounds.sample(fed, 2, adapter, client_spec(scenario))
    (refused,) = gateway.pull([gateway.push(message)])
    assert refused[1].has_error() and "does not run engine 'forward'" in refused[1].error.reason
    assert old.check_in().WhichOneof("outcome") == "wait"
    # Local forward-gradient steps (no probes) need torch: refused for every phone.
    local = train_message(node_of(gateway, probing), adapter, 1, "client.engine=forward")
    (refused,) = gateway.pull([gateway.push(local)])
    assert refused[1].has_error() and "only as FwdLLM's probes" in refused[1].error.reason
    assert PROBES_KEY not in local.content[CONFIG_KEY]
    with pytest.raises(ConfigError, match="phones run engine 'forward' only as FwdLLM"):
        gateway_on = load_scenario(
            "tiny", ["client.engine=forward", "gateway.enabled=true", f"gateway.token={TOKEN}"]
        )
        check_federation(gateway_on, traits_of(build_strategy("fedavg", {}, 3, 1)), 3, {})

    # Probes of other directions than those sent (here: their order) are refused.
    fed, scenario = fwdllm_federation(gateway, probing, adapter)
    (message,) = rounds.sample(fed, 2, adapter, client_spec(scenario))
    message_id = gateway.push(message)
    task = probing.check_in().task
    sent = list(task.config.probe_indices)
    steps = [(i, 0.5) for i in reversed(sent)] if len(set(sent)) > 1 else [(sent[0] + 1, 0.5)]
    with pytest.raises(DeviceError) as excinfo:
        probing.submit(task, {}, pb.UpdateMetrics(num_examples=8, loss=1.0), steps=steps)
    assert status_and_code(excinfo) == (grpc.StatusCode.INVALID_ARGUMENT, pb.BAD_UPDATE)
    assert "not the task's probe_indices" in str(excinfo.value)
    ((_, reply),) = gateway.pull([message_id])
    assert reply.has_error() and "not the task's probe_indices" in reply.error.reason
