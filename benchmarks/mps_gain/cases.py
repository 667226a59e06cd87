"""What is measured, shared by the engine, the orchestrator and the report without importing torch:
the Qwen2.5 shapes, the two workloads, a case's text form, and the files engines meet at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BF16_BYTES = 2


@dataclass(frozen=True)
class ModelShape:
    """One Qwen2.5 model as its config.json states it (hidden_size, num_hidden_layers, ...)."""

    size: str
    hidden: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool

    @property
    def model(self) -> str:
        return f"Qwen/Qwen2.5-{self.size}-Instruct"

    @property
    def q_width(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def group(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.q_heads // self.kv_heads

    @property
    def params(self) -> int:
        qkv = self.q_width + 2 * self.kv_width
        per_layer = (
            self.hidden * qkv + qkv  # fused QKV projection, with Qwen2's bias
            + self.q_width * self.hidden  # output projection
            + 3 * self.hidden * self.intermediate  # SwiGLU: gate, up, down
            + 2 * self.hidden  # two RMSNorms
        )
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden  # + the final norm

    @property
    def params_billion(self) -> float:
        return round(self.params / 1e9, 3)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_width * BF16_BYTES


SHAPES = {
    shape.size: shape
    for shape in (
        ModelShape("0.5B", 896, 24, 14, 2, 64, 4864, 151936, tied_embeddings=True),
        ModelShape("1.5B", 1536, 28, 12, 2, 128, 8960, 151936, tied_embeddings=True),
        ModelShape("3B", 2048, 36, 16, 2, 128, 11008, 151936, tied_embeddings=True),
        ModelShape("7B", 3584, 28, 28, 4, 128, 18944, 152064, tied_embeddings=False),
    )
}
SHAPES_BY_MODEL = {shape.model: shape for shape in SHAPES.values()}

# ---------------------------------------------------------------- workloads

WORKLOADS = ("decode", "prefill")
DECODE_BATCH = 32  # decode-heavy: sequences decoding together
DECODE_REQUEST_TOKENS = 256  # decode-heavy: a request "finishes" after this many generated tokens
PREFILL_TOKENS = 8192  # prefill-heavy: prompt tokens a prefill step takes (caps its activations)
TOKENS_AFTER_PREFILL = 16  # prefill-heavy: tokens generated per prompt (the prefill's own + 15 decode steps)


@dataclass(frozen=True)
class Case:
    context: int
    workload: str
    cpu_work_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS or self.context < 1 or self.cpu_work_ms < 0:
            raise ValueError(f"not a case: {self}")

    @property
    def batch(self) -> int:
        return DECODE_BATCH if self.workload == "decode" else max(1, PREFILL_TOKENS // self.context)

    @property
    def cache_tokens(self) -> int:
        """Slots per sequence in the static KV cache: the prompt, plus the tokens generated after it."""
        return self.context if self.workload == "decode" else self.context + TOKENS_AFTER_PREFILL

    def kv_cache_bytes(self, shape: ModelShape) -> int:
        return self.batch * self.cache_tokens * shape.kv_bytes_per_token

    @property
    def spec(self) -> str:
        return f"{self.context}:{self.workload}:{self.cpu_work_ms:g}"

    @classmethod
    def parse(cls, spec: str, cpu_work_ms: float = 0.0) -> Case:
        """`CONTEXT:WORKLOAD[:CPU_WORK_MS]`; `cpu_work_ms` where the spec has none."""
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"not CONTEXT:WORKLOAD[:CPU_WORK_MS]: {spec!r}")
        return cls(int(parts[0]), parts[1], float(parts[2]) if len(parts) == 3 else cpu_work_ms)


def parse_cases(specs: str, cpu_work_ms: float = 0.0) -> list[Case]:
    return [Case.parse(spec, cpu_work_ms) for spec in specs.split(",") if spec]


def format_cases(cases: list[Case] | tuple[Case, ...]) -> str:
    return ",".join(case.spec for case in cases)


# ---------------------------------------------------------------- where engines meet


def marker(run_dir: Path, case_index: int, stage: str, engine_index: int) -> Path:
    """An empty file an engine writes when it reaches `stage` of a case: `ready` (cache and graph
    built), `measuring` (warm-up over), `measured` (its window over). Engines wait for each other's
    `ready` and `measured`; the orchestrator waits for `measuring` to time its scrape of the agent."""
    return run_dir / f"case{case_index}.{stage}.{engine_index}"


def all_marked(run_dir: Path, case_index: int, stage: str, engines: int) -> bool:
    return all(marker(run_dir, case_index, stage, index).exists() for index in range(engines))
