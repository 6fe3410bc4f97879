"""The passkey generator: the answer is present at the stated depth; the scorer counts hits."""

import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastweights.errors import FastWeightsWarning
from fastweights.eval.passkey import passkey_eval, passkey_sample


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def pass key value return the is what remember it 0123456789\n" * 50], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [200, 333])
def test_needle_at_stated_depth(tokenizer, depth, length):
    rng = np.random.default_rng(7)
    hay = np.asarray(tokenizer("x = value + 1\n" * 300, add_special_tokens=False)["input_ids"])
    s = passkey_sample(tokenizer, hay, length, depth, rng)
    ids = s["input_ids"].tolist()
    assert len(ids) == length
    needle = tokenizer.decode(ids[s["needle_start"] : s["needle_start"] + s["needle_len"]])
    assert needle == f"\nThe pass key is {s['key']}. Remember it. {s['key']} is the pass key.\n"
    haystack_len = length - s["needle_len"] - (length - s["answer_start"]) - len(
        tokenizer("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"])
    assert s["needle_start"] == round(depth * haystack_len)
    assert tokenizer.decode(ids[s["answer_start"]:]) == f" {s['key']}"
    assert tokenizer.decode(ids[: s["answer_start"]]).endswith("What is the pass key? The pass key is")
    assert 10000 <= s["key"] < 100000


def test_bad_depth_and_length(tokenizer):
    hay = np.zeros(1000, dtype=np.int64)
    with pytest.raises(ValueError, match="depth"):
        passkey_sample(tokenizer, hay, 200, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="too short"):
        passkey_sample(tokenizer, hay, 10, 0.5, np.random.default_rng(0))


class _Oracle(torch.nn.Module):
    """Predicts the next token of a fixed sequence perfectly (or never, if wrong=True)."""

    def __init__(self, vocab, wrong=False):
        super().__init__()
        self.vocab, self.wrong, self.w = vocab, wrong, torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids, position_ids=None, use_cache=False):
        self.seen.append(input_ids)
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})()


class _Store:
    def __init__(self, docs):
        self.docs, self.lengths = docs, np.array([len(d) for d in docs])

    def __len__(self):
        return len(self.docs)

    def doc(self, i):
        return self.docs[i]


def test_passkey_eval_scores_hits(tokenizer):
    store = _Store([np.asarray(tokenizer("a = 1\n" * 100, add_special_tokens=False)["input_ids"])])
    V = len(tokenizer)
    good = passkey_eval(_Oracle(V), tokenizer, store, [150, 200], [0.0, 1.0], trials=2, progress=False)
    bad = passkey_eval(_Oracle(V, wrong=True), tokenizer, store, [150, 200], [0.0, 1.0], trials=2, progress=False)
    assert good["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert bad["accuracy"] == [[0.0, 0.0], [0.0, 0.0]]


def test_passkey_eval_gives_each_submodule_its_mode_back(tokenizer):
    """passkey_eval left the whole model in eval mode (a training run's later steps then ran
    without dropout); now every submodule gets the mode it had."""
    store = _Store([np.asarray(tokenizer("a = 1\n" * 100, add_special_tokens=False)["input_ids"])])
    model = _Oracle(len(tokenizer)).train()
    model.inner = torch.nn.Linear(1, 1).eval()  # a mixed model
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    passkey_eval(model, tokenizer, store, [150], [0.5], trials=1, progress=False)
    assert seen == [False] and model.training and not model.inner.training


def test_passkey_eval_bad_arguments(tokenizer):
    store = _Store([np.asarray(tokenizer("a = 1\n" * 100, add_special_tokens=False)["input_ids"])])
    model = _Oracle(len(tokenizer))
    with pytest.raises(ValueError, match=r"at least one length and one depth, got \[\] and \[0.0\]"):
        passkey_eval(model, tokenizer, store, [], [0.0], progress=False)
    with pytest.raises(ValueError, match="trials must be an integer >= 1, got 0"):
        passkey_eval(model, tokenizer, store, [150], [0.0], trials=0, progress=False)
    with pytest.raises(ValueError, match="the haystack split has no tokens"):  # it used to loop forever
        passkey_eval(model, tokenizer, _Store([]), [150], [0.0], progress=False)


def test_position_plot_puts_each_loss_on_its_bucket():
    """A bucket without a loss leaves a gap, and runs with other buckets share one axis."""
    from fastweights.eval.lm import position_edges
    from fastweights.eval.plot import bucket_axis

    def res(edges, losses):
        return {"buckets": [{"start": a, "end": b, "loss": v} for a, b, v in zip(edges, edges[1:], losses)]}

    spans, lines = bucket_axis([("a", res([0, 8, 16, 32], [1.0, None, 3.0])), ("b", res([0, 16, 32], [2.0, 4.0]))])
    assert spans == [(0, 8), (0, 16), (8, 16), (16, 32)]
    assert lines == [("a", [0, 3], [1.0, 3.0]), ("b", [1, 3], [2.0, 4.0])]
    with pytest.raises(ValueError, match="at least one run"):
        bucket_axis([])
    with pytest.raises(ValueError, match=r"need integers first >= 1 and length >= 2, got first=1.5"):
        position_edges(100, 1.5)



def test_haystack_holds_no_eos_and_joins_documents_with_a_blank_line(tokenizer):
    """The haystack used to be the stored documents as they are, each ending in EOS: a model
    trained on packed documents never reads on past an EOS within one sequence."""
    from fastweights.eval.passkey import haystack, passkey_prompts

    eos = tokenizer.eos_token_id

    def doc(text):
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])

    store = _Store([doc("a = 1\n" * 20), doc(""), doc("def f():\n    return 2\n" * 20)])
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hay = haystack(store, 400, eos, sep)  # one pass over the split (400 of its 402 tokens): no warning
    assert len(hay) == 400 and eos not in hay.tolist()
    with pytest.warns(FastWeightsWarning, match="fewer than the 1000 tokens .*documents repeat"):
        assert haystack(store, 1000, eos, sep)[:400].tolist() == hay.tolist()  # about 2.5 passes
    expect = (tokenizer.decode(store.doc(0)[:-1]) + "\n\n" + tokenizer.decode(store.doc(2)[:-1]) + "\n\n") * 3
    assert tokenizer.decode(hay) == tokenizer.decode(tokenizer(expect, add_special_tokens=False)["input_ids"][:400])
    for s in passkey_prompts(tokenizer, store, [150, 333], [0.0, 0.5, 1.0], trials=2):
        assert eos not in s["input_ids"].tolist()
    with pytest.raises(ValueError, match=r"length 20 is too short for a passkey prompt"):
        passkey_prompts(tokenizer, store, [150, 20], [0.5], trials=1)


def _metaspace_tokenizer(split):
    """A Llama-like SentencePiece-style tokenizer: Metaspace pieces, "<s>" before every text."""
    from tokenizers import processors

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=split)
    backend.decoder = decoders.Metaspace(prepend_scheme="first", split=split)
    text = ("Some text. More text.\nThe pass key is 12345. Remember it. 12345 is the pass key.\n"
            "What is the pass key? The pass key is 67890.\n\n") * 50
    backend.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("split", [True, False])
def test_passkey_pieces_are_tokenised_as_in_the_prompt_text(tokenizer, split):
    """The needle, the question and the answer were each encoded alone: a SentencePiece-style
    (Metaspace) tokenizer then began each with a word-start "▁" that never occurs mid-text, and the
    scored answer was not how the prompt's own text tokenises. Byte-level BPE prompts are unchanged."""
    from fastweights.eval.passkey import ANSWER, NEEDLE, QUESTION, passkey_prompts

    tok = _metaspace_tokenizer(split)

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    hay = np.asarray(enc("Some text. More text. " * 100))
    for depth in (0.0, 0.5, 1.0):
        s = passkey_sample(tok, hay, 150, depth, np.random.default_rng(3))
        ids, key, ns = s["input_ids"].tolist(), s["key"], s["needle_start"]
        assert ids[0] == tok.bos_token_id and len(ids) == 150
        # the same text tokenised whole: its needle, and its question and answer, are the prompt's
        before, needle = "Some text", NEEDLE.format(key=key)  # no merge across the joins
        middle = before + needle + "More text"
        full = enc(middle + QUESTION + ANSWER.format(key=key))
        assert enc(before + needle)[: len(enc(before))] == enc(before)
        assert ids[ns : ns + s["needle_len"]] == enc(before + needle)[len(enc(before)) :]
        assert full[: len(enc(middle))] == enc(middle)
        tail = full[len(enc(middle)) :]
        assert ids[-len(tail) :] == tail
        assert ids[s["answer_start"] :] == s["answer_ids"].tolist() == full[len(full) - len(s["answer_ids"]) :]
        assert tok.decode(s["answer_ids"]).endswith(str(key))
        assert tok.decode(ids).endswith(f"pass key is {key}")
    store = _Store([np.asarray(tok("Some text. More text. " * 20)["input_ids"] + [tok.eos_token_id])] * 2)
    for s in passkey_prompts(tok, store, [200], [0.5], trials=1):  # the blank line between documents too
        pieces = tok.convert_ids_to_tokens(s["input_ids"].tolist())
        assert not [p for p in pieces if p.startswith("▁\n")], pieces
        assert pieces.count("<s>") == 1 and pieces[0] == "<s>"  # the documents' own BOS are not kept
    # byte-level BPE: each piece encoded alone, as before
    hay = np.asarray(tokenizer("x = value + 1\n" * 300, add_special_tokens=False)["input_ids"])
    s = passkey_sample(tokenizer, hay, 200, 0.5, np.random.default_rng(7))
    ids, key, ns = s["input_ids"].tolist(), s["key"], s["needle_start"]
    byte_enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids[ns : ns + s["needle_len"]] == byte_enc(NEEDLE.format(key=key))
    assert s["answer_ids"].tolist() == byte_enc(ANSWER.format(key=key))
    q = byte_enc(QUESTION)
    assert ids[s["answer_start"] - len(q) : s["answer_start"]] == q
