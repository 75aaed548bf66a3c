from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Network(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NETWORK_UNSPECIFIED: _ClassVar[Network]
    NETWORK_UNMETERED: _ClassVar[Network]
    NETWORK_METERED: _ClassVar[Network]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    BAD_ENROLLMENT_TOKEN: _ClassVar[ErrorCode]
    BAD_CREDENTIAL: _ClassVar[ErrorCode]
    RATE_LIMITED: _ClassVar[ErrorCode]
    TOO_LARGE: _ClassVar[ErrorCode]
    UNSUPPORTED_VERSION: _ClassVar[ErrorCode]
    UNKNOWN_ARTIFACT: _ClassVar[ErrorCode]
    BAD_OFFSET: _ClassVar[ErrorCode]
    UNKNOWN_TASK: _ClassVar[ErrorCode]
    TASK_CLOSED: _ClassVar[ErrorCode]
    MALFORMED: _ClassVar[ErrorCode]
    CHECKSUM_MISMATCH: _ClassVar[ErrorCode]
    BAD_UPDATE: _ClassVar[ErrorCode]
    WRONG_ROUND: _ClassVar[ErrorCode]
    KEY_REUSED: _ClassVar[ErrorCode]
NETWORK_UNSPECIFIED: Network
NETWORK_UNMETERED: Network
NETWORK_METERED: Network
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_INT64: DType
ERROR_CODE_UNSPECIFIED: ErrorCode
BAD_ENROLLMENT_TOKEN: ErrorCode
BAD_CREDENTIAL: ErrorCode
RATE_LIMITED: ErrorCode
TOO_LARGE: ErrorCode
UNSUPPORTED_VERSION: ErrorCode
UNKNOWN_ARTIFACT: ErrorCode
BAD_OFFSET: ErrorCode
UNKNOWN_TASK: ErrorCode
TASK_CLOSED: ErrorCode
MALFORMED: ErrorCode
CHECKSUM_MISMATCH: ErrorCode
BAD_UPDATE: ErrorCode
WRONG_ROUND: ErrorCode
KEY_REUSED: ErrorCode

class Capabilities(_message.Message):
    __slots__ = ("ram_bytes", "runtimes", "engines", "charging", "network", "platform")
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    CHARGING_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    ram_bytes: int
    runtimes: _containers.RepeatedScalarFieldContainer[str]
    engines: _containers.RepeatedScalarFieldContainer[str]
    charging: bool
    network: Network
    platform: str
    def __init__(self, ram_bytes: _Optional[int] = ..., runtimes: _Optional[_Iterable[str]] = ..., engines: _Optional[_Iterable[str]] = ..., charging: _Optional[bool] = ..., network: _Optional[_Union[Network, str]] = ..., platform: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("protocol_version", "enrollment_token", "device_name", "capabilities")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    enrollment_token: str
    device_name: str
    capabilities: Capabilities
    def __init__(self, protocol_version: _Optional[int] = ..., enrollment_token: _Optional[str] = ..., device_name: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "credential", "protocol_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    credential: str
    protocol_version: int
    def __init__(self, device_id: _Optional[str] = ..., credential: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: Capabilities
    def __init__(self, capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class CheckInResponse(_message.Message):
    __slots__ = ("task", "wait", "finished")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    task: Task
    wait: Wait
    finished: Finished
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("retry_after_seconds", "reason")
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_seconds: int
    reason: str
    def __init__(self, retry_after_seconds: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("name", "artifact_id", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    artifact_id: str
    size: int
    def __init__(self, name: _Optional[str] = ..., artifact_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "graph_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRAPH_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    graph_name: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., graph_name: _Optional[str] = ...) -> None: ...

class TrainConfig(_message.Message):
    __slots__ = ("engine", "lr", "local_steps", "batch_size", "seq_len", "seed", "eps", "run_seed", "num_seeds", "probe_indices")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    RUN_SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_SEEDS_FIELD_NUMBER: _ClassVar[int]
    PROBE_INDICES_FIELD_NUMBER: _ClassVar[int]
    engine: str
    lr: float
    local_steps: int
    batch_size: int
    seq_len: int
    seed: int
    eps: float
    run_seed: int
    num_seeds: int
    probe_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, engine: _Optional[str] = ..., lr: _Optional[float] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., seed: _Optional[int] = ..., eps: _Optional[float] = ..., run_seed: _Optional[int] = ..., num_seeds: _Optional[int] = ..., probe_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "round", "config", "artifacts", "adapter", "deadline_seconds")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    config: TrainConfig
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactRef]
    adapter: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    deadline_seconds: float
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., config: _Optional[_Union[TrainConfig, _Mapping]] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactRef, _Mapping]]] = ..., adapter: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., deadline_seconds: _Optional[float] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("artifact_id", "offset")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    offset: int
    def __init__(self, artifact_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorBundle(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class UpdateMetrics(_message.Message):
    __slots__ = ("num_examples", "loss", "loss_first", "loss_last", "compute_seconds", "peak_rss_mb", "cpu_seconds")
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIRST_FIELD_NUMBER: _ClassVar[int]
    LOSS_LAST_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_MB_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    loss: float
    loss_first: float
    loss_last: float
    compute_seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    def __init__(self, num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., loss_first: _Optional[float] = ..., loss_last: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., peak_rss_mb: _Optional[float] = ..., cpu_seconds: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("task_id", "round", "idempotency_key", "total_size", "sha256", "metrics", "seed_indices", "seed_scalars")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SEED_INDICES_FIELD_NUMBER: _ClassVar[int]
    SEED_SCALARS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    idempotency_key: str
    total_size: int
    sha256: str
    metrics: UpdateMetrics
    seed_indices: _containers.RepeatedScalarFieldContainer[int]
    seed_scalars: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., metrics: _Optional[_Union[UpdateMetrics, _Mapping]] = ..., seed_indices: _Optional[_Iterable[int]] = ..., seed_scalars: _Optional[_Iterable[float]] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeclineTaskRequest(_message.Message):
    __slots__ = ("task_id", "round", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class DeclineTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "message", "retry_after_seconds")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    retry_after_seconds: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., retry_after_seconds: _Optional[int] = ...) -> None: ...
