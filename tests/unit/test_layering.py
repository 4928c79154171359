"""One-way dependencies: prior/ and cache/ never import RLlib (see docs/architecture.md)."""

import subprocess
import sys

BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray.rllib" or name.startswith("ray.rllib."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, _Block())
import cachellm_rl.contracts, cachellm_rl.config
import cachellm_rl.prior.prompts, cachellm_rl.prior.scoring, cachellm_rl.prior.server
import cachellm_rl.prior.tiny_model
import cachellm_rl.cache.adaptive, cachellm_rl.cache.meta, cachellm_rl.cache.index
import cachellm_rl.cache.encoders, cachellm_rl.cache.actor, cachellm_rl.cache.client
import cachellm_rl.cache.correctness, cachellm_rl.cache.learned_encoder
import cachellm_rl.cache.verifier
import cachellm_rl.cache.fidelity
assert not any(m.startswith("ray.rllib") for m in sys.modules)
print("ok")
"""


def test_prior_and_cache_do_not_import_rllib():
    out = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
