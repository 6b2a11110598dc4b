"""Engine configuration: one validated, frozen dataclass.

YAML and CLI parsing live at the edges (``configs/``, ``rollout.cli``); the library takes kwargs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine_core.errors import InvalidConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Requests one generate call may expand to (batch size x n): GRPO-style rollouts send a few
# hundred prompts x n = 4..64 per call; a million-sample typo is refused instead of queued.
DEFAULT_MAX_REQUESTS_PER_CALL = 8192


MAX_THREADS = 1024


def check_device_usable(device: str) -> None:
    """Refuse, by name, a device this process cannot compute on (checked where an engine
    starts: a driver may describe engines for machines other than its own)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError("device", device, "CUDA is not available in this process")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine. Names follow SGLang where it has one, else vLLM.

    KV capacity comes from ``max_total_tokens`` when set, else from ``mem_fraction_static``
    (SGLang's: that fraction of the device memory -- on CPU the available RAM -- minus the
    weights, resolved when the engine starts), else from ``kv_cache_memory_bytes``, else (None,
    the default) from the memory available at start-up, capped (``engine_core.kv_budget``).
    ``Engine(**kwargs)`` also takes SGLang's ``ServerArgs`` names (``engine_core.sglang_args``).
    ``dtype="auto"`` means the checkpoint dtype on CUDA and float32 on CPU (bf16 matmul on an
    AVX2-only CPU is ~100x slower than fp32).
    """

    model_path: str
    dtype: str = "auto"
    # Opt-in on CPU: store the linear and embedding weights as "bfloat16" while computing in
    # float32 (half the bytes a decode step reads; logprobs move by the rounding of the
    # weights, docs/PERFORMANCE.md), or "int8": the matmul reads int8 copies of the matrices
    # (symmetric, one scale per output row; a quarter of the bytes; logprobs move by the
    # quantization, docs/PERFORMANCE.md) while the parameters stay float32. "auto": weights in
    # ``dtype``.
    weight_dtype: str = "auto"
    device: str = dataclasses.field(default_factory=default_device)
    page_size: int = 16
    max_total_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    mem_fraction_static: float | None = None
    max_running_requests: int = 64
    max_num_batched_tokens: int = 2048
    # Bound on batch size x n of one generate call (more raises InvalidRequestError at once).
    max_requests_per_call: int = DEFAULT_MAX_REQUESTS_PER_CALL
    context_length: int | None = None
    seed: int = 0
    skip_tokenizer_init: bool = False
    tp_size: int = 1
    deterministic: bool = False
    # TP reduction: True = fixed rank-order sum (bitwise identical on every rank and run),
    # False = the backend's native all-reduce (benchmarked against each other).
    deterministic_all_reduce: bool = True
    weight_version: str = "default"
    # RL control (engine_core.sleep): release the KV cache after this many idle seconds (None:
    # never) and wake on the next request; also the weights when sleep_on_idle_weights.
    sleep_on_idle_s: float | None = None
    sleep_on_idle_weights: bool = False
    # Keep released weights in pinned host memory (None: on CUDA only; on CPU it frees nothing).
    weights_host_copy: bool | None = None
    # A request while memory is released by hand: "raise" EngineReleasedError, or "wait".
    generate_while_released: str = "raise"
    # Distributed refits stage a whole update per rank (atomicity) into one of two buffers; a
    # complete update becomes the weights' storage. True keeps the idle buffer for the next
    # refit (no allocation, ~1 model of memory per rank); False frees it after every commit.
    keep_refit_staging: bool = True
    # Radix prefix cache (engine_core.scheduling.radix_cache): requests reuse the KV pages of
    # prompt prefixes other requests computed on the same weights (SGLang: disable_radix_cache).
    enable_prefix_cache: bool = True
    # torch threads of the engine's process (None: torch's default; with TP, the cores split
    # evenly over the ranks). A trainer whose logprobs must match bit for bit uses the same.
    num_threads: int | None = None
    # A failed refit / weight-group verb: "return" SGLang's ``(False, message)`` (weights and
    # version unchanged), or "raise" the typed error (the Ray service's EngineActor does).
    refit_errors: str = "return"
    # Stream chunks (SGLang's ServerArgs names): False = each chunk holds everything so far
    # (SGLang's default), True = only what is new (chunks concatenate to the output).
    incremental_streaming_output: bool = False
    # generate(return_hidden_states=True) is refused unless enabled (as SGLang).
    enable_return_hidden_states: bool = False

    def __post_init__(self) -> None:
        self._check_choice("dtype", self.dtype, DTYPES)
        self._check_choice("device", self.device, ("cpu", "cuda"))
        self._check_choice("weight_dtype", self.weight_dtype, ("auto", "bfloat16", "int8"))
        narrow = self.weight_dtype != "auto"
        if narrow and (self.device != "cpu" or self.dtype not in ("auto", "float32")):
            raise InvalidConfigError(
                "weight_dtype",
                self.weight_dtype,
                "narrow weights with float32 compute is a CPU mode (dtype auto/float32); on "
                "CUDA set dtype='bfloat16'",
            )
        for name in (
            "page_size",
            "max_running_requests",
            "max_num_batched_tokens",
            "max_requests_per_call",
            "tp_size",
        ):
            self._check_positive(name, getattr(self, name))
        if self.max_total_tokens is not None:
            self._check_positive("max_total_tokens", self.max_total_tokens)
            if self.max_total_tokens < self.page_size:
                raise InvalidConfigError(
                    "max_total_tokens", self.max_total_tokens, f"below page_size={self.page_size}"
                )
        if self.kv_cache_memory_bytes is not None:
            self._check_positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        fraction = self.mem_fraction_static
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= 1
        ):
            raise InvalidConfigError("mem_fraction_static", fraction, "must be a number in (0, 1]")
        if self.context_length is not None:
            self._check_positive("context_length", self.context_length)
        if self.num_threads is not None:
            self._check_positive("num_threads", self.num_threads)
            if self.num_threads > MAX_THREADS:  # OpenMP would try to start them all
                raise InvalidConfigError(
                    "num_threads", self.num_threads, f"must be at most {MAX_THREADS}"
                )
        if not isinstance(self.seed, int):
            raise InvalidConfigError("seed", self.seed, "must be an int")
        self._check_control()

    def _check_control(self) -> None:
        idle = self.sleep_on_idle_s
        if idle is not None and (isinstance(idle, bool) or not isinstance(idle, (int, float))):
            raise InvalidConfigError("sleep_on_idle_s", idle, "must be a number of seconds")
        if idle is not None and not idle > 0:
            raise InvalidConfigError("sleep_on_idle_s", idle, "must be > 0 (None: off)")
        for f in dataclasses.fields(self):  # a string "false" would read as True
            if f.type in ("bool", "bool | None"):
                value = getattr(self, f.name)
                if not isinstance(value, bool) and not (value is None and f.type != "bool"):
                    raise InvalidConfigError(f.name, value, "must be a bool")
        if self.weights_host_copy and self.device != "cuda":
            raise InvalidConfigError(
                "weights_host_copy", True, "a host copy of CPU weights frees no memory"
            )
        self._check_choice(
            "generate_while_released", self.generate_while_released, ("raise", "wait")
        )
        self._check_choice("refit_errors", self.refit_errors, ("return", "raise"))

    @staticmethod
    def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise InvalidConfigError(name, value, f"must be one of {choices}")

    @staticmethod
    def _check_positive(name: str, value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidConfigError(name, value, "must be a positive int")

    @classmethod
    def from_kwargs(cls, model_path: str, **kwargs: object) -> EngineConfig:
        """Build from EngineConfig field names or SGLang ``ServerArgs`` names
        (``engine_core.sglang_args``), rejecting unknown keys by name."""
        return cls.from_translated(model_path, cls.translate(model_path, kwargs))

    @classmethod
    def translate(cls, model_path: str, kwargs: dict[str, object]):
        from engine_core.sglang_args import translate

        return translate(model_path, kwargs, {f.name for f in dataclasses.fields(cls)})

    @classmethod
    def from_translated(cls, model_path: str, translated) -> EngineConfig:
        """An error about a field set through an SGLang name names that name too."""
        try:
            return cls(model_path=model_path, **translated.engine)  # type: ignore[arg-type]
        except InvalidConfigError as exc:
            alias = translated.aliases.get(exc.field)
            if alias is None:
                raise
            raise InvalidConfigError(f"{alias} (-> {exc.field})", exc.value, exc.reason) from None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
