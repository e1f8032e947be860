import copy

import pytest

from lowbit.models import load_preset


@pytest.fixture(scope="session")
def tiny():
    return load_preset("tiny-bert")


@pytest.fixture(scope="session")
def tiny_roberta():
    return load_preset("roberta-tiny")


def make_batch(tok, n=4, max_len=16, seed=0):
    sents = ["a charming and often affecting journey .", "unflinchingly bleak and desperate",
             "the movie is a disaster", "it is great fun", "slow , dull and far too long",
             "an utterly delightful film"][:n]
    enc = tok(sents, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture
def fresh(tiny):
    """A deep copy of the tiny-bert model in eval mode, and a batch."""
    model, tok = tiny
    return copy.deepcopy(model).eval(), make_batch(tok)


@pytest.fixture(scope="session")
def batch_of():
    """``batch_of(tokenizer, n=4, max_len=16)``: a small tokenized batch."""
    return make_batch
