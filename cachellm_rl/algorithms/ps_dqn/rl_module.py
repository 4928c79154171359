"""``PSDQNTorchRLModule``: a DRRN Q-network over text observations that explores by sampling
the masked posterior ``log p(a|s) + Q(s,a)/T``.

DRRN: He et al., "Deep Reinforcement Learning with a Natural Language Action Space" (ACL 2016).
Deviations: GRU encoders (as in later text-game agents; the state is read in 32-token segments
whose final states are max-pooled) instead of MLPs over bags of words, an
interaction MLP over ``[h_s, h_a, h_s * h_a]`` instead of the inner product, and hashed word ids
(see :mod:`cachellm_rl.envs.text_env`). Posterior sampling over the LM prior follows DESIGN §4.6;
``exploration="epsilon"`` gives the plain epsilon-greedy DQN of the ``no_prior`` baseline.
"""

from __future__ import annotations

import itertools

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
    OBS_PRIOR_LOGP,
    OBS_STATE_TOKENS,
    OBS_TEMPERATURE,
    POSTERIOR_LOGITS,
)
from cachellm_rl.algorithms.ps_dqn.losses import masked, masked_argmax, posterior_logits

EXPLORATION_MODES = ("posterior", "epsilon")
INFERENCE_MODES = ("posterior", "q")


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
        hidden: GRU and MLP width.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        emb = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.state_encoder = TextEncoderGRU(emb, hidden)
        self.action_encoder = TextEncoderGRU(emb, hidden)
        self.head = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(
        self, state_tokens_BL: torch.Tensor, action_tokens_BAL: torch.Tensor, mask_BA: torch.Tensor
    ) -> torch.Tensor:
        b, a, _ = action_tokens_BAL.shape
        h_s_BH = self.state_encoder(state_tokens_BL.long())
        valid_N = (mask_BA > 0.5).reshape(-1)
        h_a_NH = h_s_BH.new_zeros((b * a, h_s_BH.shape[-1]))
        if valid_N.any():  # encode admissible candidates only
            h_a_NH[valid_N] = self.action_encoder(
                action_tokens_BAL.reshape(b * a, -1)[valid_N].long()
            )
        h_a_BAH = h_a_NH.reshape(b, a, -1)
        h_s_BAH = h_s_BH.unsqueeze(1).expand_as(h_a_BAH)
        q_BA = self.head(torch.cat([h_s_BAH, h_a_BAH, h_s_BAH * h_a_BAH], -1)).squeeze(-1)
        return q_BA


class PSDQNTorchRLModule(TorchRLModule, QNetAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """Posterior-sampling DQN module (new API stack).

    ``model_config`` keys: ``embed_dim`` (64), ``hidden`` (128), ``exploration``
    (``"posterior"`` | ``"epsilon"``), ``inference`` (``"posterior"`` | ``"q"``),
    ``epsilon`` as ``[[t0, eps0], [t1, eps1]]`` (linear; epsilon mode only).
    Observations without ``prior_logp`` get a uniform prior and temperature 1.
    """

    @override(RLModule)
    def setup(self) -> None:
        cfg = self.model_config or {}
        self.exploration = cfg.get("exploration", "posterior")
        self.inference = cfg.get("inference", "posterior")
        if self.exploration not in EXPLORATION_MODES:
            raise ValueError(
                f"exploration must be one of {EXPLORATION_MODES}, got {self.exploration!r}"
            )
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {self.inference!r}")
        self.epsilon_schedule = [tuple(p) for p in cfg.get("epsilon", [[0, 1.0], [10_000, 0.05]])]
        space = self.observation_space[OBS_STATE_TOKENS]
        vocab = int(space.high.max()) + 1
        self.q_net = DRRNQNetwork(vocab, int(cfg.get("embed_dim", 64)), int(cfg.get("hidden", 128)))

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _prior_and_temperature(obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mask = obs[OBS_ACTION_MASK]
        prior = obs.get(OBS_PRIOR_LOGP)
        if prior is None:
            prior = torch.zeros_like(mask, dtype=torch.float32)
        temp = obs.get(OBS_TEMPERATURE)
        if temp is None:
            temp = torch.ones(mask.shape[0], device=mask.device)
        return prior.float(), temp.float().reshape(-1)

    def _q(self, net: DRRNQNetwork, obs: dict) -> torch.Tensor:
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
    def _posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        obs = batch[Columns.OBS]
        q_BA = self._q(self.q_net, obs)
        prior_BA, temp_B = self._prior_and_temperature(obs)
        return q_BA, posterior_logits(q_BA, prior_BA, obs[OBS_ACTION_MASK], temp_B)

    @override(RLModule)
    def _forward_inference(self, batch: dict, **kwargs) -> dict:
        mask = batch[Columns.OBS][OBS_ACTION_MASK]
        q_BA, logits_BA = self._posterior(batch)
        score = logits_BA if self.inference == "posterior" else q_BA
        return {Columns.ACTIONS: masked_argmax(score, mask)}

    @override(RLModule)
    def _forward_exploration(self, batch: dict, t: int | None = None, **kwargs) -> dict:
        mask = batch[Columns.OBS][OBS_ACTION_MASK]
        q_BA, logits_BA = self._posterior(batch)
        if self.exploration == "posterior":
            actions = torch.distributions.Categorical(logits=logits_BA).sample()
        else:
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
        out = {QF_PREDS: q_BA, QF_NEXT_PREDS: q_next_BA, QF_TARGET_NEXT_PREDS: q_target_next_BA}
        prior_BA, temp_B = self._prior_and_temperature(obs)
        out[POSTERIOR_LOGITS] = posterior_logits(
            q_BA.detach(), prior_BA, obs[OBS_ACTION_MASK], temp_B
        )
        return out
