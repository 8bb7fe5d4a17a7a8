"""mlx-lm's batched generation on a ParaRNN model: every row equals generating that prompt alone.

Drives mlx-lm's own functions (BatchGenerator, batch_generate, generate_step) the way mlx-lm's
tests check its recurrent models (test_batch_matches_single, the continued-generation helper),
on a tiny converted model made here. Also the left padding of mlx-lm < 0.32.
"""

import random

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.generate import BatchGenerator, batch_generate, generate_step  # noqa: E402

from pararnn_convert.cli import main as convert_main  # noqa: E402
from pararnn_mlx.loader import load  # noqa: E402
from tests.lm_helpers import tiny_checkpoint  # noqa: E402

#: prompt lengths of one batch: 1 token, short, chunk-crossing and long rows together
LENGTHS = (1, 2, 3, 8, 31, 200)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    tiny_checkpoint(root / "torch", cell="lstm")
    assert convert_main(["to-mlx", "--model", str(root / "torch"), "--out", str(root / "mlx"), "--dtype",
                         "float32"]) == 0
    return load(root / "mlx")


def _prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


def _alone(model, prompt, max_tokens, cache=None):
    return [(int(t), lp) for t, lp in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                                     prompt_cache=cache)]


def _run(generator, prompts, caches=None):
    uids = generator.insert(prompts, caches=caches)
    tokens, logprobs, caches_out = {u: [] for u in uids}, {u: [] for u in uids}, {}
    while responses := generator.next_generated():
        for r in responses:
            tokens[r.uid].append(int(r.token))
            logprobs[r.uid].append(r.logprobs)
            if r.finish_reason is not None:
                caches_out[r.uid] = r.prompt_cache
    return uids, tokens, logprobs, caches_out


def test_batch_generator_rows_match_single_generation(model_and_tokenizer):
    model, _ = model_and_tokenizer
    prompts = _prompts(LENGTHS)
    uids, tokens, logprobs, _ = _run(BatchGenerator(model, stop_tokens=set(), max_tokens=MAX_TOKENS), prompts)
    for uid, prompt in zip(uids, prompts):
        alone = _alone(model, prompt, MAX_TOKENS)
        assert tokens[uid] == [t for t, _ in alone], f"prompt of {len(prompt)} tokens"
        for batched, (_, single) in zip(logprobs[uid], alone):
            assert mx.allclose(batched, single, rtol=1e-4, atol=1e-4).item(), f"prompt of {len(prompt)} tokens"


def test_batch_generate_text_matches_single(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(LENGTHS, seed=1)
    texts = batch_generate(model, tokenizer, prompts, max_tokens=MAX_TOKENS, verbose=False).texts
    for prompt, text in zip(prompts, texts):
        alone = [t for t, _ in _alone(model, prompt, MAX_TOKENS)]
        eos = tokenizer.eos_token_ids
        alone = alone[: next((i for i, t in enumerate(alone) if t in eos), len(alone))]
        assert text == tokenizer.decode(alone)


def test_continued_generation_from_returned_caches(model_and_tokenizer):
    """mlx-lm's continued-generation check: a second batch continues each row from its own cache,
    with a small prefill step and a completion batch smaller than the batch."""
    model, _ = model_and_tokenizer
    generator = BatchGenerator(model, stop_tokens=set(), max_tokens=5, prefill_batch_size=4,
                               prefill_step_size=4, completion_batch_size=2)
    first = _prompts((5, 3, 8, 1), seed=2)
    uids, _, _, caches = _run(generator, first)
    caches = [caches[u] for u in uids]
    second = _prompts((2, 7, 4, 6), seed=3)
    uids, tokens, logprobs, _ = _run(generator, second, caches=caches)
    for uid, prompt, cache in zip(uids, second, caches):
        alone = _alone(model, prompt, 5, cache=cache)
        assert tokens[uid] == [t for t, _ in alone]
        for batched, (_, single) in zip(logprobs[uid], alone):
            assert mx.allclose(batched, single, rtol=1e-4, atol=1e-4).item()


def test_left_padding_of_older_mlx_lm(model_and_tokenizer):
    """mlx-lm < 0.32 left-pads prompts and records it as ArraysCache.left_padding."""
    model, _ = model_and_tokenizer
    prompts = _prompts((9, 4, 1), seed=4)
    width = max(map(len, prompts))
    left = [width - len(p) for p in prompts]
    cache = model.make_cache()
    for c in cache:
        c.left_padding = mx.array(left)
    logits = model(mx.array([[0] * pad + p for pad, p in zip(left, prompts)]), cache=cache)
    step = model(mx.array([[7]] * len(prompts)), cache=cache)
    for row, prompt in enumerate(prompts):
        alone_cache = model.make_cache()
        alone = model(mx.array([prompt]), cache=alone_cache)
        alone_step = model(mx.array([[7]]), cache=alone_cache)
        np.testing.assert_allclose(np.array(logits[row, left[row]:]), np.array(alone[0]), atol=1e-4)
        np.testing.assert_allclose(np.array(step[row]), np.array(alone_step[0]), atol=1e-4)
