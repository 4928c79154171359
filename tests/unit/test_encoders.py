"""The packaged all-MiniLM-L6-v2 text encoder (real model, loaded offline)."""

from __future__ import annotations

import numpy as np
import pytest


def test_text_encoder_embeds_unit_vectors_and_memoises(text_encoder):
    texts = [
        "You are in the kitchen. You see a fridge and a red apple.",
        "You are in the kitchen. You see a fridge and a green apple.",
        "The spaceship's engine room hums; a wrench lies on the floor.",
    ]
    emb = text_encoder.encode(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > 0.8 > emb[0] @ emb[2]
    before = text_encoder.encoded
    again = text_encoder.encode([texts[1], texts[0]])
    assert text_encoder.encoded == before  # served from the memo
    np.testing.assert_array_equal(again, emb[[1, 0]])
    assert text_encoder.tag.startswith("text-384-")
    with pytest.raises(ValueError, match="strings"):
        text_encoder.encode([3])
