"""Checkpoints of trained agents: reload in a fresh process (same Q weights, same greedy
actions), ``cachellm-rl evaluate`` plays them, and mismatched ones are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from cachellm_rl.algorithms.columns import OBS_HIT_RATE, OBS_PRIOR_LOGP
from cachellm_rl.algorithms.ps_dqn.checkpoints import METADATA_FILE, save_checkpoint
from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings, algo_config_for, start_cache
from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
from cachellm_rl.envs.games import split_games
from cachellm_rl.envs.textworld_env import TextWorldEnv
from tests.helpers import TW_PRIOR_APP

pytestmark = pytest.mark.integration

SMALL = MethodSettings(
    hidden=32,
    num_envs_per_env_runner=2,
    rollout_fragment_length=4,
    learning_starts=16,
    env_steps_per_iteration=48,
    train_batch_size=16,
    prior_app=TW_PRIOR_APP,
)

RELOAD = """
import sys, numpy as np, torch
from ray.rllib.core.columns import Columns
from cachellm_rl.algorithms.ps_dqn.checkpoints import load_agent
m = load_agent(sys.argv[1])
obs = {k: torch.as_tensor(v) for k, v in np.load(sys.argv[2]).items()}
with torch.no_grad():
    actions = m.forward_inference({Columns.OBS: obs})[Columns.ACTIONS].numpy()
weights = {k: v.numpy() for k, v in m.q_net.state_dict().items()}
np.savez(sys.argv[3], actions=actions, **{"w/" + k: v for k, v in weights.items()})
"""


def _observations(games, n=6) -> dict[str, np.ndarray]:
    env = TextWorldEnv({"games": games, "expert": False, "max_episode_steps": 20})
    rng = np.random.default_rng(0)
    rows = []
    obs, info = env.reset(seed=0)
    for _ in range(n):
        rows.append(obs)
        obs, _, term, trunc, info = env.step(int(rng.integers(len(info["candidates"]))))
        if term or trunc:
            obs, info = env.reset()
    env.close()
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    mask = batch["action_mask"]
    batch[OBS_PRIOR_LOGP] = np.where(mask > 0, -1.0, 0.0).astype(np.float32)
    batch[OBS_HIT_RATE] = np.zeros((n, 1), np.float32)
    return batch


@pytest.fixture(scope="module")
def trained(tw_prior_app, tw_suite, tw_prior, tmp_path_factory):
    """A briefly trained uncached agent, its checkpoint, and its live module's outputs."""
    from cachellm_rl.algorithms.ps_dqn.suite import TextSuiteConfig, _checkpoint_metadata

    model_dir, _ = tw_prior
    name = "test-ckpt-uncached"
    handle = start_cache("uncached", SMALL, name, DEFAULT_NAMESPACE)
    games = split_games(tw_suite, "test")
    env_config = {"games": games, "expert": False, "seed": 0, "max_episode_steps": 20}
    algo = algo_config_for(
        "uncached",
        SMALL,
        env_class=TextWorldEnv,
        env_config=env_config,
        cache_name=name,
        num_env_runners=0,  # sample in the driver (no runner process to start)
        total_env_steps=200,
        seed=0,
    ).build_algo()
    out = tmp_path_factory.mktemp("ckpt")
    try:
        for _ in range(3):
            steps = algo.train()["env_runners"]["num_env_steps_sampled_lifetime"]
        cfg = TextSuiteConfig(
            games_dir=str(tw_suite),
            prior_model=str(model_dir),
            prior_temperature=1.0,  # what tw_prior_app serves with
            settings=SMALL,
            env_steps=200,
        )
        version = handle.versions.remote()
        import ray

        meta = _checkpoint_metadata(cfg, "uncached", 0, steps, env_config, ray.get(version)[0], 0.0)
        ckpt = save_checkpoint(algo, out / "uncached-s0", meta)
        obs = _observations(games)
        module = algo.get_module()
        with torch.no_grad():
            live = {k: torch.as_tensor(v) for k, v in obs.items()}
            actions = module.forward_inference({Columns.OBS: live})[Columns.ACTIONS].numpy()
        weights = {k: v.detach().numpy().copy() for k, v in module.q_net.state_dict().items()}
    finally:
        algo.stop()
        kill_cache(name, DEFAULT_NAMESPACE)
    np.savez(out / "obs.npz", **obs)
    return ckpt, out, actions, weights, meta


def test_reload_in_a_fresh_process_restores_q_weights_and_greedy_actions(trained):
    ckpt, out, actions, weights, _ = trained
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(ckpt), str(out / "obs.npz"), str(out / "re.npz")],
        check=True,
        timeout=300,
    )
    re = np.load(out / "re.npz")
    assert {k[2:] for k in re.files if k.startswith("w/")} == set(weights)
    for k, w in weights.items():
        np.testing.assert_array_equal(re["w/" + k], w)  # exactly the trained weights
    assert np.abs(weights["head.2.weight"]).sum() > 0  # trained: Q is no longer 0
    np.testing.assert_array_equal(re["actions"], actions)


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cachellm_rl.cli", "evaluate", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_evaluate_command_plays_a_checkpoint_and_refuses_mismatches(trained, tw_suite):
    ckpt, out, _, _, meta = trained
    base = ["--checkpoint", str(ckpt), "--games", str(tw_suite), "--num-games", "2"]
    ok = _evaluate(*base, "--env", "textworld", "--json", str(out / "eval.json"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads((out / "eval.json").read_text())
    assert res["games"] == 2 and 0.0 <= res["success"] <= 1.0 and res["method"] == "uncached"
    assert "success" in ok.stdout and res["prior"] == "uncached"
    # Another env than the checkpoint's: refused with one line, exit 2.
    bad = _evaluate(*base, "--env", "babyai")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "trained on env 'textworld'" in bad.stderr
    # A prior whose version differs (another temperature gives another version): refused.
    tampered = Path(out / "tampered")
    tampered.mkdir()
    for f in ckpt.iterdir():
        (tampered / f.name).symlink_to(f)
    (tampered / METADATA_FILE).unlink()
    (tampered / METADATA_FILE).write_text(json.dumps({**meta, "prior_version": "0123abcd"}))
    wrong = _evaluate("--checkpoint", str(tampered), "--games", str(tw_suite), "--env", "textworld")
    assert wrong.returncode == 2 and "prior version 0123abcd" in wrong.stderr
    missing = _evaluate("--checkpoint", str(out / "nope"), "--env", "textworld")
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
