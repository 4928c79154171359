"""``PriorServer``: the LM prior behind a batching Ray Serve deployment (see docs/priors.md).

The deployment is a thin shell around :class:`~cachellm_rl.prior.scoring.CandidateScorer`:
``@serve.batch`` gathers concurrent :class:`PriorRequest` objects and scores them in one call.
The HTTP proxy is off unless asked; callers use a ``DeploymentHandle``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

from ray import serve

from cachellm_rl.contracts import DEFAULT_PRIOR_APP, PriorRequest, PriorResponse
from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig


@dataclass(frozen=True, kw_only=True)
class PriorServerConfig:
    """Deployment settings of :class:`PriorServer`.

    Attributes:
        scorer: Model and scoring settings.
        max_batch_size: Most requests scored in one batch.
        batch_wait_timeout_s: Longest wait for a batch to fill.
        max_ongoing_requests: Requests a replica accepts at once (>= ``max_batch_size``).
        num_replicas: Serve replicas.
        num_cpus: CPUs reserved per replica (fractions allowed on small machines).
        num_gpus: GPUs per replica.
        http: Start the Serve HTTP proxy on loopback (off by default).
    """

    scorer: ScorerConfig
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 64
    num_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    http: bool = False
    extra_actor_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("PriorServerConfig.max_batch_size must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"PriorServerConfig.max_ongoing_requests ({self.max_ongoing_requests}) must be "
                f">= max_batch_size ({self.max_batch_size}) or batches can never fill"
            )
        if self.batch_wait_timeout_s < 0:
            raise ValueError("PriorServerConfig.batch_wait_timeout_s must be >= 0")
        if self.num_replicas < 1:
            raise ValueError("PriorServerConfig.num_replicas must be >= 1")


@serve.deployment(name="PriorServer", max_ongoing_requests=64)
class PriorServer:
    """Ray Serve deployment scoring candidate actions with a causal LM.

    Args:
        config: Deployment settings; its ``scorer`` says which model to load.
    """

    def __init__(self, config: PriorServerConfig) -> None:
        self._scorer = CandidateScorer(config.scorer)
        # serve.batch's stubs type the wrapper as a bare coroutine function, but at runtime it
        # carries these setters (documented Serve API).
        self.score_batch.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self.score_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            config.batch_wait_timeout_s
        )
        self._batch_sizes: list[int] = []
        self._score_s = 0.0
        self._candidates = 0
        self._prompt_chars = 0

    async def __call__(self, request: PriorRequest) -> PriorResponse:
        """Score one request (batched with concurrent ones)."""
        outcome = await self.score_batch(request)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def score_many(self, requests: list[PriorRequest]) -> list[PriorResponse | Exception]:
        """Score several requests sent as one call (the cache actor sends all misses of one
        vector step together: one round trip instead of one per state). The requests still
        join Serve's batch with concurrent callers'. A bad request fails alone."""
        return list(await asyncio.gather(*[self._one(r) for r in requests]))

    async def _one(self, request: PriorRequest) -> PriorResponse | Exception:
        try:
            return await self.score_batch(request)
        except Exception as exc:  # returned to that request's caller only
            return exc

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def score_batch(self, requests: list[PriorRequest]) -> list[PriorResponse | Exception]:
        """Score a batch; a bad request fails alone, not its batch-mates."""
        self._batch_sizes.append(len(requests))
        self._candidates += sum(len(r.candidates) for r in requests)
        self._prompt_chars += sum(len(r.prompt) for r in requests)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._score_each, requests)

    def _score_each(self, requests: list[PriorRequest]) -> list[PriorResponse | Exception]:
        t0 = time.perf_counter()
        try:
            return self._score_all(requests)
        finally:
            self._score_s += time.perf_counter() - t0

    def _score_all(self, requests: list[PriorRequest]) -> list[PriorResponse | Exception]:
        # One packed forward pass for the batch where the model allows it; a bad request's
        # exception goes back to that caller only.
        return self._scorer.score_each(requests)

    def model_version(self) -> str:
        """Hash of the served weights (and adapter)."""
        return self._scorer.model_version

    def prompt_layout(self) -> dict:
        """The prompt layout of the served model (``PromptConfig`` fields): clients build their
        requests with it, since a prior must be prompted the way it was trained."""
        return asdict(self._scorer.prompt_config)

    def batch_sizes(self) -> list[int]:
        """Sizes of the batches scored so far (for tests and benchmarks)."""
        return list(self._batch_sizes)

    def timings(self) -> dict[str, float]:
        """Batches, requests, their candidates and prompt characters, and seconds spent scoring
        so far (for benchmarks: what a request costs depends on its size)."""
        return {
            "batches": float(len(self._batch_sizes)),
            "requests": float(sum(self._batch_sizes)),
            "candidates": float(self._candidates),
            "prompt_chars": float(self._prompt_chars),
            "score_s": self._score_s,
        }


def prior_application(config: PriorServerConfig):
    """The bound Serve application of :class:`PriorServer`: ``num_replicas`` replicas, each
    reserving ``num_cpus`` and ``num_gpus`` (a fraction lets replicas share one GPU)."""
    actor_options = {"num_cpus": config.num_cpus, **config.extra_actor_options}
    if config.num_gpus:
        actor_options["num_gpus"] = config.num_gpus
    # mypy does not apply class decorators: @serve.deployment made PriorServer a Deployment.
    return PriorServer.options(  # type: ignore[attr-defined]
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(config)


def deploy_prior_server(config: PriorServerConfig, *, app_name: str = DEFAULT_PRIOR_APP):
    """Start Serve (proxy off unless ``config.http``) and deploy :class:`PriorServer`.

    Args:
        config: Deployment settings.
        app_name: Serve application name the cache actor looks up.

    Returns:
        The application's ``DeploymentHandle``.
    """
    if config.http:
        serve.start(http_options={"host": "127.0.0.1"})
    else:
        serve.start(proxy_location="Disabled")
    return serve.run(
        prior_application(config),
        name=app_name,
        route_prefix="/prior" if config.http else None,
        logging_config={"enable_access_log": False},
    )
