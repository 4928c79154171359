"""``PSDQNTorchRLModule``: a DRRN Q-network over text observations that explores by sampling
the masked posterior ``beta * log p(a|s) + Q(s,a)/T`` (:mod:`.posterior`).

DRRN: He et al., "Deep Reinforcement Learning with a Natural Language Action Space" (ACL 2016):
separate encoders for the state and for each candidate action, Q from their interaction. As in
the paper the default encoders read bags of words, here of hashed words *and* hashed word
bigrams (``encoder="bag"``), which keeps local word order ("fried pork" vs "pork fried") at the
cost of one embedding lookup per token; ``encoder="gru"`` reads the tokens with GRUs (32-token
segments, max-pooled), about 10x slower per update on CPU. Deviations from the paper: an
interaction MLP over ``[h_s, h_a, h_s * h_a]`` instead of the inner product, hashed word ids
(see :mod:`cachellm_rl.envs.text_env`), and a zero-initialised output layer, so an untrained
network has ``Q = 0`` and the posterior is exactly the prior (the ``frozen_q`` control).
``exploration="epsilon"`` gives the plain epsilon-greedy DQN of the ``no_prior`` baseline.
"""

from __future__ import annotations

import itertools

import gymnasium as gym
import torch
from ray.rllib.algorithms.dqn.dqn_learner import QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, QNetAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from cachellm_rl.algorithms.columns import (
    OBS_ACTION_MASK,
    OBS_ACTION_TOKENS,
    OBS_HIT_RATE,
    OBS_PRIOR_LOGP,
    OBS_STATE_TOKENS,
)
from cachellm_rl.algorithms.ps_dqn.losses import masked, masked_argmax, posterior_logits
from cachellm_rl.algorithms.ps_dqn.posterior import PosteriorConfig

EXPLORATION_MODES = ("posterior", "epsilon")
INFERENCE_MODES = ("posterior", "q")
ENCODERS = ("bag", "gru")
_BIGRAM_MULT = 1_000_003


class HashedBagEncoder(nn.Module):
    """Mean embedding of a text's words and hashed word bigrams, then a ReLU layer.

    Bigram ids are hashed into the word vocabulary (``(a * M + b) mod (V - 1) + 1``); a bigram
    touching padding is padding. One ``embedding_bag`` call per batch: no recurrence.

    Args:
        embedding: Shared word embedding (id 0 is padding).
        hidden: Output width.
        bigrams: Add hashed bigrams to the bag.

    Example:
        >>> enc = HashedBagEncoder(nn.Embedding(50, 4, padding_idx=0), hidden=3)
        >>> enc(torch.tensor([[5, 7, 0, 0], [0, 0, 0, 0]])).shape
        torch.Size([2, 3])
    """

    def __init__(self, embedding: nn.Embedding, hidden: int, bigrams: bool = True) -> None:
        super().__init__()
        self.embedding = embedding
        self.bigrams = bigrams
        self.proj = nn.Linear(embedding.embedding_dim, hidden)

    def forward(self, tokens_NL: torch.Tensor) -> torch.Tensor:
        ids_NL = tokens_NL.long()
        if self.bigrams and ids_NL.shape[1] > 1:
            a_NL, b_NL = ids_NL[:, :-1], ids_NL[:, 1:]
            vocab = self.embedding.num_embeddings
            bi_NL = (a_NL * _BIGRAM_MULT + b_NL) % (vocab - 1) + 1
            bi_NL = bi_NL.masked_fill((a_NL == 0) | (b_NL == 0), 0)
            ids_NL = torch.cat([ids_NL, bi_NL], dim=1)
        sum_NE = nn.functional.embedding_bag(
            ids_NL, self.embedding.weight, mode="sum", padding_idx=0
        )
        count_N1 = (ids_NL > 0).sum(dim=1, keepdim=True).clamp_min(1)
        return torch.relu(self.proj(sum_NE / count_N1))


class TextEncoderGRU(nn.Module):
    """Embeds padded token ids and returns the GRU state after the last real token.

    Long texts are cut into segments of ``segment_tokens`` that the GRU reads in parallel; the
    segment states are max-pooled. On CPU this is ~6x faster than one GRU pass over 256 tokens
    (the sequential length is what costs), and it keeps word order within segments.

    Args:
        embedding: Shared word embedding.
        hidden: GRU width.
        segment_tokens: Segment length (texts not longer than this are read in one pass).
    """

    def __init__(self, embedding: nn.Embedding, hidden: int, segment_tokens: int = 32) -> None:
        super().__init__()
        self.embedding = embedding
        self.gru = nn.GRU(embedding.embedding_dim, hidden, batch_first=True)
        self.segment_tokens = segment_tokens

    def forward(self, tokens_NL: torch.Tensor) -> torch.Tensor:
        n, length = tokens_NL.shape
        seg = min(self.segment_tokens, length)
        pad = (-length) % seg
        if pad:
            tokens_NL = nn.functional.pad(tokens_NL, (0, pad))
        segs_MS = tokens_NL.reshape(-1, seg)
        out_MSH, _ = self.gru(self.embedding(segs_MS))
        lens_M = (segs_MS > 0).sum(-1)
        idx = (lens_M.clamp_min(1) - 1).view(-1, 1, 1).expand(-1, 1, out_MSH.shape[-1])
        h_MH = out_MSH.gather(1, idx).squeeze(1)
        h_MH = h_MH.masked_fill((lens_M == 0).view(-1, 1), -1e4)
        h_NH = h_MH.reshape(n, -1, h_MH.shape[-1]).max(dim=1).values
        return h_NH.clamp_min(-1.0)  # an all-padding text encodes as -1 (GRU states are in [-1, 1])


class DRRNQNetwork(nn.Module):
    """``Q(s, a)`` for every candidate slot of a text observation.

    Args:
        vocab_size: Hashed vocabulary size.
        embed_dim: Word embedding size (shared by the state and action encoders).
        hidden: Encoder and MLP width.
        encoder: ``"bag"`` (hashed words + bigrams) or ``"gru"``.
    """

    def __init__(
        self, vocab_size: int, embed_dim: int = 64, hidden: int = 128, encoder: str = "bag"
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        emb = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        make = HashedBagEncoder if encoder == "bag" else TextEncoderGRU
        self.state_encoder = make(emb, hidden)
        self.action_encoder = make(emb, hidden)
        out = nn.Linear(hidden, 1)
        # Q = 0 before any update: the untrained posterior is exactly the prior.
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.head = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), out)

    def forward(
        self, state_tokens_BL: torch.Tensor, action_tokens_BAL: torch.Tensor, mask_BA: torch.Tensor
    ) -> torch.Tensor:
        """Q of every slot; slots that are not admissible get 0 (callers mask them)."""
        b, a, _ = action_tokens_BAL.shape
        h_s_BH = self.state_encoder(state_tokens_BL.long())
        # Encode and score admissible candidates only: states offer ~10-20 of the 64 slots.
        idx_N = (mask_BA > 0.5).reshape(-1).nonzero().squeeze(-1)
        q_flat = h_s_BH.new_zeros(b * a)
        if idx_N.numel():
            h_a_NH = self.action_encoder(action_tokens_BAL.reshape(b * a, -1)[idx_N].long())
            h_s_NH = h_s_BH[idx_N // a]
            q_N = self.head(torch.cat([h_s_NH, h_a_NH, h_s_NH * h_a_NH], -1)).squeeze(-1)
            q_flat = q_flat.index_put((idx_N,), q_N)
        return q_flat.reshape(b, a)


class PSDQNTorchRLModule(TorchRLModule, QNetAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """Posterior-sampling DQN module (new API stack).

    ``model_config`` keys: ``embed_dim`` (64), ``hidden`` (128), ``encoder`` (``"bag"`` |
    ``"gru"``), ``exploration`` (``"posterior"`` | ``"epsilon"``), ``inference``
    (``"posterior"`` | ``"q"``), ``posterior`` (a :class:`PosteriorConfig` as a dict: ``beta``
    and the temperature schedule), ``epsilon`` as ``[[t0, eps0], [t1, eps1]]`` over global env
    steps (linear; epsilon mode only). Exploration runs at ``T`` of the schedule at the global
    env step RLlib passes as ``t``; inference at the schedule's final ``T``. Observations
    without ``prior_logp`` get a uniform prior, without ``hit_rate`` a hit rate of 0.
    """

    @override(RLModule)
    def setup(self) -> None:
        cfg = self.model_config if isinstance(self.model_config, dict) else {}
        self.exploration = cfg.get("exploration", "posterior")
        self.inference = cfg.get("inference", "posterior")
        if self.exploration not in EXPLORATION_MODES:
            raise ValueError(
                f"exploration must be one of {EXPLORATION_MODES}, got {self.exploration!r}"
            )
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {self.inference!r}")
        self.epsilon_schedule = [tuple(p) for p in cfg.get("epsilon", [[0, 1.0], [10_000, 0.05]])]
        self.posterior = PosteriorConfig.from_dict(cfg.get("posterior"))
        self.last_t: int | None = None  # global env step of the last exploration forward
        assert isinstance(self.observation_space, gym.spaces.Dict)
        space = self.observation_space[OBS_STATE_TOKENS]
        assert isinstance(space, gym.spaces.Box)
        vocab = int(space.high.max()) + 1
        self.q_net = DRRNQNetwork(
            vocab,
            int(cfg.get("embed_dim", 64)),
            int(cfg.get("hidden", 128)),
            str(cfg.get("encoder", "bag")),
        )

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _prior_and_hit_rate(obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mask = obs[OBS_ACTION_MASK]
        prior = obs.get(OBS_PRIOR_LOGP)
        if prior is None:
            prior = torch.zeros_like(mask, dtype=torch.float32)
        hit = obs.get(OBS_HIT_RATE)
        if hit is None:
            hit = torch.zeros(mask.shape[0], device=mask.device)
        return prior.float(), hit.float().reshape(-1)

    def temperatures(self, hit_rate_B: torch.Tensor, t: int | None) -> torch.Tensor:
        """``T`` per row at global env step ``t`` (None: the schedule's final ``T``)."""
        if self.posterior.schedule == "hit_rate":
            temps = [self.posterior.temperature_at(t, float(h)) for h in hit_rate_B.tolist()]
            return torch.tensor(temps, dtype=torch.float32, device=hit_rate_B.device)
        return torch.full_like(hit_rate_B, self.posterior.temperature_at(t), dtype=torch.float32)

    def _q(self, net: nn.Module, obs: dict) -> torch.Tensor:
        return net(obs[OBS_STATE_TOKENS], obs[OBS_ACTION_TOKENS], obs[OBS_ACTION_MASK])

    def epsilon(self, t: int | None) -> float:
        """Epsilon of the epsilon-greedy mode at global env step ``t`` (linear schedule)."""
        pts = self.epsilon_schedule
        if t is None:
            return pts[-1][1]
        if t <= pts[0][0]:
            return pts[0][1]
        for (t0, e0), (t1, e1) in itertools.pairwise(pts):
            if t <= t1:
                return e0 + (e1 - e0) * (t - t0) / max(t1 - t0, 1)
        return pts[-1][1]

    # -- QNetAPI ------------------------------------------------------------------------------
    @override(QNetAPI)
    def compute_q_values(self, batch: dict) -> dict:
        obs = batch[Columns.OBS]
        return {QF_PREDS: masked(self._q(self.q_net, obs), obs[OBS_ACTION_MASK])}

    # -- TargetNetworkAPI ---------------------------------------------------------------------
    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self._target_q_net = make_target_network(self.q_net)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self):
        return [(self.q_net, self._target_q_net)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict) -> dict:
        obs = batch[Columns.OBS]
        return {QF_PREDS: masked(self._q(self._target_q_net, obs), obs[OBS_ACTION_MASK])}

    # -- InferenceOnlyAPI ---------------------------------------------------------------------
    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["_target_q_net"]

    # -- forward passes -----------------------------------------------------------------------
    def _posterior(self, batch: dict, t: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        obs = batch[Columns.OBS]
        q_BA = self._q(self.q_net, obs)
        prior_BA, hit_B = self._prior_and_hit_rate(obs)
        logits_BA = posterior_logits(
            q_BA,
            prior_BA,
            obs[OBS_ACTION_MASK],
            self.temperatures(hit_B, t),
            self.posterior.prior_weight,
        )
        return q_BA, logits_BA

    @override(RLModule)
    def _forward_inference(self, batch: dict, **kwargs) -> dict:
        mask = batch[Columns.OBS][OBS_ACTION_MASK]
        q_BA, logits_BA = self._posterior(batch, None)
        score = logits_BA if self.inference == "posterior" else q_BA
        return {Columns.ACTIONS: masked_argmax(score, mask)}

    @override(RLModule)
    def _forward_exploration(self, batch: dict, t: int | None = None, **kwargs) -> dict:
        mask = batch[Columns.OBS][OBS_ACTION_MASK]
        self.last_t = t
        if self.exploration == "posterior":
            _, logits_BA = self._posterior(batch, t)
            actions = torch.distributions.Categorical(logits=logits_BA).sample()
        else:
            q_BA = self._q(self.q_net, batch[Columns.OBS])
            greedy = masked_argmax(q_BA, mask)
            uniform = torch.distributions.Categorical(logits=masked(torch.zeros_like(q_BA), mask))
            explore = torch.rand(greedy.shape, device=greedy.device) < self.epsilon(t)
            actions = torch.where(explore, uniform.sample(), greedy)
        return {Columns.ACTIONS: actions}

    @override(RLModule)
    def _forward_train(self, batch: dict, **kwargs) -> dict:
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        both = {k: torch.cat([obs[k], next_obs[k]], 0) for k in obs}
        q_both = masked(self._q(self.q_net, both), both[OBS_ACTION_MASK])
        q_BA, q_next_BA = torch.chunk(q_both, 2, dim=0)
        q_target_next_BA = self.forward_target({Columns.OBS: next_obs})[QF_PREDS]
        return {QF_PREDS: q_BA, QF_NEXT_PREDS: q_next_BA, QF_TARGET_NEXT_PREDS: q_target_next_BA}
