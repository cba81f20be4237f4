"""``synthetic_language``: a small probabilistic grammar with long-range structure, for tiny decoders.

A sentence is ``DET ADJ* NOUN [ (clause) ] VERB DET ADJ* NOUN .`` — the verb agrees in number with
the subject noun across an optional bracketed clause, clauses nest up to depth 3 and hold nouns of
either number (distractors), and every closing bracket matches the type of its opening one. The
sampler records the probability of every token it draws; the state is a function of the prefix, so
their mean negative log is the best loss any model can reach (``meta["entropy_rate"]``).
"""
from __future__ import annotations

import math

import torch

from .._errors import InvalidOptionError
from .._random import SeedLike, as_seed
from ._dataset import IGNORE_INDEX, ConceptDataset

_CLASSES = {
    "bos": ["<bos>"], "end": ["."],
    "det_sg": ["a", "each", "every", "this"], "det_pl": ["some", "many", "these", "all"], "det_any": ["the", "my"],
    "adj": ["big", "small", "old", "new", "red", "blue", "happy", "sad", "fast", "slow", "tall", "short"],
    "noun_sg": ["cat", "dog", "bird", "frog", "tree", "car", "book", "cup", "king", "queen", "boy", "girl",
                "hat", "ship", "star", "moon"],
    "verb_sg": ["sees", "likes", "finds", "takes", "makes", "helps", "wants", "needs", "moves", "holds"],
    "open": ["(", "[", "{", "<"], "close": [")", "]", "}", ">"],
    "filler": ["very", "quite", "often", "here", "there", "now", "then", "still", "also", "maybe", "soon", "again"],
}
_CLASSES["noun_pl"] = [w + "s" for w in _CLASSES["noun_sg"]]
_CLASSES["verb_pl"] = [w[:-1] for w in _CLASSES["verb_sg"]]
LANGUAGE_VOCAB = [w for ws in _CLASSES.values() for w in ws]  # 96 tokens, <bos> = 0
_ID = {c: torch.tensor([LANGUAGE_VOCAB.index(w) for w in ws]) for c, ws in _CLASSES.items()}
LANGUAGE_CONCEPTS = ["bos", "det", "adj", "noun", "verb", "open", "close", "filler", "end", "plural",
                     "in_brackets", "depth_odd", "awaiting_verb", "subject_plural", "sentence_start"]
START, SUBJ, AFTER, BODY, VERB, OBJDET, OBJ, END = range(8)
MAX_DEPTH = 3
P_DET = (0.35, 0.35, 0.3)  # singular, plural, either ("the", "my": the number shows at the noun)


def _pick(ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return ids[(u * len(ids)).long()]


def _generate(n: int, length: int, g: torch.Generator) -> dict:
    """Tokens ``[n, length]`` (``<bos>`` first), the log-probability of each, and latent variables."""
    tok = torch.zeros(n, length, dtype=torch.long)
    logp = torch.zeros(n, length)
    rec = {k: torch.zeros(n, length, dtype=torch.long) for k in ("depth", "num", "state", "prev_state")}
    state = torch.full((n,), START)
    num, onum, depth = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    stack = torch.zeros(n, MAX_DEPTH, dtype=torch.long)
    fresh = torch.zeros(n, dtype=torch.bool)  # a bracket was just opened: it may not close yet
    nouns, verbs = torch.cat([_ID["noun_sg"], _ID["noun_pl"]]), torch.cat([_ID["verb_sg"], _ID["verb_pl"]])
    dets = [_ID["det_sg"], _ID["det_pl"], _ID["det_any"]]
    rows = torch.arange(n)
    for t in range(1, length):
        u0, u1, u2 = torch.rand(3, n, generator=g)
        new, out, lp, d_rec = state.clone(), torch.zeros(n, dtype=torch.long), torch.zeros(n), depth.clone()

        m = (state == START) | (state == OBJDET)  # a determiner; its class fixes the noun's number
        cat = (u0 >= P_DET[0]).long() + (u0 >= P_DET[0] + P_DET[1]).long()
        for c in range(3):
            mc = m & (cat == c)
            out[mc] = _pick(dets[c], u1[mc])
            lp[mc] = math.log(P_DET[c] / len(dets[c]))
        value = torch.where(cat == 2, -1, cat)
        num = torch.where(state == START, value, num)
        onum = torch.where(state == OBJDET, value, onum)
        new[state == START], new[state == OBJDET] = SUBJ, OBJ

        m = (state == SUBJ) | (state == OBJ)  # adjectives, then the noun
        p_adj = torch.where(state == SUBJ, 0.35, 0.25)
        adj, noun = m & (u0 < p_adj), m & (u0 >= p_adj)
        out[adj], lp[adj] = _pick(_ID["adj"], u1[adj]), torch.log(p_adj[adj] / 12)
        cur = torch.where(state == SUBJ, num, onum)
        draw = torch.where(cur < 0, (u2 < 0.5).long(), cur)
        out[noun] = nouns[draw[noun] * 16 + (u1[noun] * 16).long()]
        lp[noun] = torch.log((1 - p_adj[noun]) / 16) + (cur[noun] < 0) * math.log(0.5)
        num = torch.where(noun & (state == SUBJ), draw, num)
        new[noun & (state == SUBJ)], new[noun & (state == OBJ)] = AFTER, END

        m = state == AFTER  # open a clause, or go straight to the verb
        opn, vb = m & (u0 < 0.4), (m & (u0 >= 0.4)) | (state == VERB)
        out[vb] = verbs[num[vb] * 10 + (u1[vb] * 10).long()]
        lp[vb] = torch.where(state[vb] == VERB, math.log(0.1), math.log(0.06))
        new[vb] = OBJDET

        m = state == BODY  # inside brackets: close, open, filler or noun
        w = torch.stack([0.35 * ~fresh, 0.15 * (depth < MAX_DEPTH), torch.full((n,), 0.35), torch.full((n,), 0.15)], 1)
        w = w / w.sum(1, keepdim=True)
        choice = (u0[:, None] >= w.cumsum(1)).sum(1).clamp(max=3)
        p = w[rows, choice]
        close, filler, bnoun = m & (choice == 0), m & (choice == 2), m & (choice == 3)
        out[close], lp[close] = _ID["close"][stack[close, (depth[close] - 1).clamp(min=0)]], torch.log(p[close])
        out[filler], lp[filler] = _pick(_ID["filler"], u1[filler]), torch.log(p[filler] / 12)
        out[bnoun], lp[bnoun] = _pick(nouns, u1[bnoun]), torch.log(p[bnoun] / 32)
        opn = opn | (m & (choice == 1))
        kind = (u1 * 4).long()
        out[opn] = _ID["open"][kind[opn]]
        lp[opn] = torch.where(state[opn] == AFTER, math.log(0.1), torch.log(p[opn] / 4))
        stack[opn, depth[opn].clamp(max=MAX_DEPTH - 1)] = kind[opn]
        depth = depth + opn.long() - close.long()
        d_rec = torch.where(opn, depth, d_rec)  # an open bracket is inside its clause; a close one too
        fresh = torch.where(opn, True, torch.where(m, False, fresh))
        new[opn] = BODY
        new[close & (depth == 0)] = VERB

        out[state == END] = _ID["end"][0]  # lp = log 1
        new[state == END] = START
        tok[:, t], logp[:, t] = out, lp
        rec["depth"][:, t], rec["num"][:, t], rec["prev_state"][:, t], rec["state"][:, t] = d_rec, num, state, new
        state = new
    return dict(tokens=tok, logp=logp, **rec)


def synthetic_language(n: int, seq_len: int = 32, seed: SeedLike = 0) -> ConceptDataset:
    """Sequences of a small grammar with agreement and matching brackets, for tiny decoder transformers.

    Vocabulary: 96 tokens (``<bos>`` = 0, ``"."``, determiners, adjectives, 16 nouns and 10 verbs in
    singular and plural, 4 bracket pairs, 12 fillers). Every row starts with ``<bos>`` and a new
    sentence; no padding. Token-level concepts: the token's class (``bos`` ``det`` ``adj`` ``noun``
    ``verb`` ``open`` ``close`` ``filler`` ``end``), ``plural`` (a plural det/noun/verb), and latent
    state after the token: ``in_brackets``, ``depth_odd``, ``awaiting_verb`` (subject seen, its verb
    not yet), ``subject_plural``, and ``sentence_start``.

    Args:
        n: number of sequences (> 0).
        seq_len: tokens per sequence (>= 4).
        seed: same seed, same sequences.

    Returns:
        ``inputs`` int64 ``[n, seq_len]``; ``labels`` int64 ``[n, seq_len]`` = the next tokens (the
        sampler draws ``seq_len + 1``), so every position has a target; ``concepts`` bool
        ``[n, seq_len, 15]``; ``meta["entropy_rate"]``: the best achievable loss (nats/token) on
        these labels. Compare a model's loss with it and with ``unigram_entropy(ds)``.

    Example:
        >>> ds = synthetic_language(200, seq_len=16, seed=0)
        >>> ds.inputs.shape, int(ds.inputs[0, 0]), bool((ds.labels[:, :-1] == ds.inputs[:, 1:]).all())
        (torch.Size([200, 16]), 0, True)
        >>> ds.meta["entropy_rate"] < unigram_entropy(ds)
        True
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise InvalidOptionError(f"n must be a positive int (number of sequences); got n={n!r}.")
    if not isinstance(seq_len, int) or seq_len < 4:
        raise InvalidOptionError(f"seq_len must be an int >= 4; got seq_len={seq_len!r}.")
    seed = as_seed(seed)
    sample = _generate(n, seq_len + 1, torch.Generator().manual_seed(seed))
    tokens = sample["tokens"]
    cls = torch.zeros(len(LANGUAGE_VOCAB), 9, dtype=torch.bool)  # [V, 9] token -> class
    groups = [["bos"], ["det_sg", "det_pl", "det_any"], ["adj"], ["noun_sg", "noun_pl"], ["verb_sg", "verb_pl"],
              ["open"], ["close"], ["filler"], ["end"]]
    for k, names in enumerate(groups):
        for c in names:
            cls[_ID[c], k] = True
    plural = torch.zeros(len(LANGUAGE_VOCAB), dtype=torch.bool)
    plural[torch.cat([_ID["det_pl"], _ID["noun_pl"], _ID["verb_pl"]])] = True
    x = tokens[:, :seq_len]
    rec = {k: v[:, :seq_len] for k, v in sample.items()}
    concepts = torch.cat([cls[x], plural[x][..., None], torch.stack([
        rec["depth"] >= 1, rec["depth"] % 2 == 1,
        (rec["state"] == AFTER) | (rec["state"] == BODY) | (rec["state"] == VERB),
        rec["num"] == 1, (rec["prev_state"] == START) & (torch.arange(seq_len) > 0)], -1)], -1)
    meta = dict(generator="synthetic_language", seed=seed, seq_len=seq_len, bos_id=0, pad_id=None,
                entropy_rate=float(-sample["logp"][:, 1:].mean()),
                task="next-token prediction (labels[:, t] = the token after inputs[:, t])")
    return ConceptDataset(x, tokens[:, 1:], label_names=LANGUAGE_VOCAB, concept_names=LANGUAGE_CONCEPTS,
                          concepts=concepts, vocab=LANGUAGE_VOCAB, meta=meta)


def unigram_entropy(dataset: ConceptDataset) -> float:
    """Entropy (nats per token) of the data set's target tokens: the loss of a model that ignores context.

    Counts ``dataset.labels`` (ignoring ``IGNORE_INDEX``); a language model should end well below it.
    """
    if dataset.labels is None or dataset.vocab is None:
        raise InvalidOptionError("unigram_entropy needs a text data set with next-token labels.")
    y = dataset.labels[dataset.labels != IGNORE_INDEX]
    p = torch.bincount(y, minlength=len(dataset.vocab)).double() / max(len(y), 1)
    p = p[p > 0]
    return float(-(p * p.log()).sum())
