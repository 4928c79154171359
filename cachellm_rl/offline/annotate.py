"""Priors for an offline dataset, asked through the shared cache actor and the Serve prior
(see docs/offline.md).

Annotating a dataset (in the driver, one cache-actor call per batch of states, file by file)
adds a ``prior_logp`` column (the prior's log-probabilities over the
observation's candidate slots, 0 on empty slots, as the online connector writes them) to a
copy of the dataset. Every state goes through the same named cache actor and Serve deployment
as online training, under one of the cache presets:

- ``uncached``: one LM call per transition (what a learner without a cache pays);
- ``exact_only``: the exact tier only, at most one LM call per distinct state;
- ``static``, ``adaptive``: the semantic presets of the online suite.

LM queries, hits and the prior's model version are counted per preset in the annotated
dataset's card, and a dataset is annotated once per (dataset, preset): seeds and learners
reuse it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, TextIO

from cachellm_rl.offline.datasets import CARD_FILE, COL_INFOS, COL_OBS, json_default, read_card

ANNOTATION_PRESETS = ("uncached", "exact_only", "static", "adaptive")
PRIOR_LOGP_COLUMN = "prior_logp"


def annotated_dir(dataset_dir: str | Path, preset: str) -> Path:
    """Where a dataset annotated under ``preset`` goes: ``<dataset>-prior-<preset>``."""
    d = Path(dataset_dir)
    return d.with_name(f"{d.name}-prior-{preset}")


def annotation_encoder(preset: str, settings) -> str:
    """What embeds the states of an annotation: ``"minilm"``, or the tag of the learned state
    encoder (``settings.state_encoder_dir``, used by the ``adaptive`` preset only). An
    annotation made with another encoder is made again."""
    enc_dir = getattr(settings, "state_encoder_dir", None)
    if preset != "adaptive" or enc_dir is None:
        return "minilm"
    from cachellm_rl.cache.learned_encoder import saved_encoder_tag

    return f"learned:{saved_encoder_tag(enc_dir)}"


def annotate_dataset(
    dataset_dir: str | Path,
    preset: str,
    settings,
    *,
    cache_name: str = "cachellm_offline_annotation",
    out: str | Path | None = None,
    batch_states: int = 64,
    progress: bool = False,
    bar_file: TextIO | None = None,
    log=print,
) -> dict:
    """Annotate a dataset with priors under a cache preset (idempotent).

    Args:
        dataset_dir: A dataset made by ``cachellm-rl data make``.
        preset: ``uncached``, ``exact_only``, ``static`` or ``adaptive``.
        settings: The suite's ``MethodSettings`` (the cache settings of each preset and
            ``prior_app``, the Serve application of the prior, which must be deployed).
        cache_name: Name of the (fresh) cache actor used for this annotation.
        out: Annotated dataset folder (default :func:`annotated_dir`).
        batch_states: States per cache-actor call.
        progress: Progress bar.
        bar_file: The progress bar's stream (default stderr).
        log: Where one-line status messages go.

    Returns:
        The annotated dataset's card: the dataset's card plus ``annotation``.
    """
    import ray

    from cachellm_rl.algorithms.ps_dqn.methods import connector_config_for, start_cache
    from cachellm_rl.cache.actor import kill_cache

    if preset not in ANNOTATION_PRESETS:
        raise ValueError(f"unknown annotation preset {preset!r}; known: {list(ANNOTATION_PRESETS)}")
    src = Path(dataset_dir)
    card = read_card(src)
    if card is None:
        raise ValueError(f"{src} is not a dataset (no {CARD_FILE}); make it with `data make`")
    dst = Path(out) if out is not None else annotated_dir(src, preset)
    done = read_card(dst)
    encoder = annotation_encoder(preset, settings)
    if (
        done is not None
        and done.get("fingerprint") == card["fingerprint"]
        and done.get("annotation", {}).get("preset") == preset
        and done["annotation"].get("state_encoder", "minilm") == encoder
    ):
        log(f"{dst}: already annotated under {preset}")
        return done
    if done is not None:
        log(f"{dst}: annotated with other settings; annotating again under {preset}")
    t0 = time.perf_counter()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from cachellm_rl.algorithms.ps_dqn.connectors import (
        make_prior_client,
        prior_row,
        text_state_from_info,
    )

    files = sorted(src.glob("*.parquet"))
    kill_cache(cache_name)
    handle = start_cache(preset, settings, cache_name, "cachellm_rl", env=card["env"])
    tmp = dst.with_name(dst.name + ".partial")
    for d in (tmp, dst):
        if d.exists():
            shutil.rmtree(d)
    tmp.mkdir(parents=True)
    try:
        client = make_prior_client(connector_config_for(preset, settings, cache_name))
        bar = tqdm(
            total=card["transitions"],
            desc=f"priors ({preset})",
            disable=not progress,
            file=bar_file,
        )
        for f in files:
            table = pq.read_table(f)
            infos = table.column(COL_INFOS).to_pylist()
            num_slots = len(table.column(COL_OBS)[0].as_py()["action_mask"]) if len(table) else 0
            rows: list[list[float]] = []
            for i in range(0, len(infos), batch_states):
                batch = infos[i : i + batch_states]  # the texts are stored under the info keys
                results = client.get_priors([text_state_from_info(x) for x in batch])
                rows += [prior_row(r.logp, num_slots).tolist() for r in results]
                bar.update(len(results))
            table = table.append_column(
                PRIOR_LOGP_COLUMN, pa.array(rows, type=pa.list_(pa.float32()))
            )
            pq.write_table(table, tmp / f.name, compression="zstd")
        bar.close()
        stats = ray.get(handle.stats.remote())
        version, _ = ray.get(handle.versions.remote())
    finally:
        del handle
        kill_cache(cache_name)
    decisions = int(getattr(stats, "decisions", 0))
    lm = int(getattr(stats, "lm_queries", 0))
    reuse = decisions - lm
    annotation: dict[str, Any] = {
        "preset": preset,
        "state_encoder": encoder,
        "prior_model_version": version,
        "transitions": card["transitions"],
        "distinct_states": card["distinct_states"],
        "decisions": decisions,
        "lm_queries": lm,
        "lm_queries_per_transition": lm / card["transitions"] if card["transitions"] else 0.0,
        "reused": reuse,
        "hits_exact": int(getattr(stats, "hits_exact", 0)),
        "hits_semantic": int(getattr(stats, "hits_semantic", 0)),
        "coalesced": int(getattr(stats, "coalesced_misses", 0)),
        # served semantic reuses checked against a fresh LM call (``audit_probability``)
        "audits": int(getattr(stats, "audits", 0)),
        "audits_wrong": int(getattr(stats, "audits_wrong", 0)),
        "seconds": time.perf_counter() - t0,
    }
    out_card = {**card, "annotation": annotation}
    (tmp / CARD_FILE).write_text(json.dumps(out_card, indent=1, default=json_default))
    tmp.rename(dst)
    log(
        f"{dst}: {preset}, {lm} LM queries for {card['transitions']} transitions "
        f"({card['distinct_states']} distinct states)"
    )
    return out_card
