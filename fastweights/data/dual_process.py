"""The dual-process synthetic task of Anand et al. (ICLR 2025), as specified in SPEC §7.

Vocabulary (ids): ``0`` pad, ``1`` mask, ``2`` cop, then ``V`` content tokens, then ``V/10``
held-out tokens that never occur in training. Content tokens are half nouns, half adjectives;
a fraction ``ambiguous`` of each half may take either role. Each content token has a Zipf
rank (a random permutation of ``1..V``) and unigram weight ``rank^-zipf``.

A sequence is 7 tokens, built from one noun ``n`` and one adjective ``a``:
prefix ``[cop, a, n]`` or ``[n, cop, a]``, then suffix ``[a, a, a, a]`` or ``[n, a, n, n]``
(each choice uniform). The last three tokens are masked targets. Reading the suffix needs
the role of its first token: from the structure (the token after ``cop`` is the adjective;
structural in-context learning) or from the token's memorised role (in-weights learning).

Evaluation sets (the metric: all three targets correct):

- ``val``: the training distribution;
- ``switch``: unambiguous nouns in the adjective slot and adjectives in the noun slot
  (Zipf-weighted, so mostly frequent tokens); ``iwl_targets`` holds the completion that the
  memorised roles would give, to measure in-weights learning;
- ``tail``: both tokens drawn uniformly from the rarest 10% of ranks;
- ``holdout``: both tokens drawn uniformly from the held-out tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, MASK, COP = 0, 1, 2
SPLITS = ("train", "val", "switch", "tail", "holdout")
SEQ_LEN = 7
N_TARGETS = 3


@dataclass
class DualProcessTask:
    """Vocabulary, roles and Zipf weights of the task; ``sample`` draws batches.

    Args:
        vocab: number of content tokens ``V`` (even, ``>= 20``).
        zipf: Zipf exponent of token frequencies (``> 0``).
        ambiguous: fraction of content tokens that may be noun or adjective.
        seed: seed of the vocabulary (roles, ranks); batches take their own generator.
    """

    vocab: int = 10_000
    zipf: float = 1.0
    ambiguous: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab < 20 or self.vocab % 2:
            raise ValueError(f"vocab must be an even number >= 20, got {self.vocab}")
        if not self.zipf > 0:
            raise ValueError(f"zipf must be > 0, got {self.zipf}")
        if not 0.0 <= self.ambiguous < 1.0:
            raise ValueError(f"ambiguous must be in [0, 1), got {self.ambiguous}")
        g = torch.Generator().manual_seed(self.seed)
        V, half = self.vocab, self.vocab // 2
        self.first_content = 3
        self.first_holdout = 3 + V
        self.n_holdout = V // 10
        self.size = self.first_holdout + self.n_holdout  # total vocabulary, special tokens included
        ids = torch.arange(self.first_content, self.first_holdout)
        perm = torch.randperm(V, generator=g)
        self.nouns_all, self.adjs_all = ids[perm[:half]].sort().values, ids[perm[half:]].sort().values
        n_amb = round(self.ambiguous * half)
        amb_n = self.nouns_all[torch.randperm(half, generator=g)[:n_amb]]
        amb_a = self.adjs_all[torch.randperm(half, generator=g)[:n_amb]]
        self.ambiguous_ids = torch.cat([amb_n, amb_a]).sort().values
        is_amb = torch.zeros(self.size, dtype=torch.bool)
        is_amb[self.ambiguous_ids] = True
        self.pure_nouns = self.nouns_all[~is_amb[self.nouns_all]]
        self.pure_adjs = self.adjs_all[~is_amb[self.adjs_all]]
        # Noun-capable: nouns plus ambiguous adjectives; adjective-capable likewise.
        self.noun_pool = torch.cat([self.nouns_all, amb_a]).sort().values
        self.adj_pool = torch.cat([self.adjs_all, amb_n]).sort().values
        self.rank = torch.zeros(self.size, dtype=torch.long)  # 1 = most frequent; 0 for non-content
        self.rank[ids[torch.randperm(V, generator=g)]] = torch.arange(1, V + 1)
        self.weight = torch.zeros(self.size, dtype=torch.float64)
        self.weight[ids] = self.rank[ids].double() ** -self.zipf
        self.tail_ids = ids[self.rank[ids] > V - V // 10]
        self.holdout_ids = torch.arange(self.first_holdout, self.size)

    def _draw(self, pool: torch.Tensor, n: int, g: torch.Generator, zipf: bool) -> torch.Tensor:
        w = self.weight[pool] if zipf else torch.ones(len(pool), dtype=torch.float64)
        return pool[torch.multinomial(w, n, replacement=True, generator=g)]

    def _pair(self, split: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noun-slot tokens, adjective-slot tokens), each ``[n]``, distinct within a pair."""
        tail = torch.zeros(self.size, dtype=torch.bool)
        tail[self.tail_ids] = True
        pools = {
            "train": (self.noun_pool, self.adj_pool, True),
            "val": (self.noun_pool, self.adj_pool, True),
            "switch": (self.pure_adjs, self.pure_nouns, True),
            "tail": (self.noun_pool[tail[self.noun_pool]], self.adj_pool[tail[self.adj_pool]], False),
            "holdout": (self.holdout_ids, self.holdout_ids, False),
        }
        noun_pool, adj_pool, zipf = pools[split]
        nouns, adjs = self._draw(noun_pool, n, g, zipf), self._draw(adj_pool, n, g, zipf)
        clash = nouns == adjs
        while clash.any():  # an ambiguous or held-out token cannot fill both slots
            adjs[clash] = self._draw(adj_pool, int(clash.sum()), g, zipf)
            clash = nouns == adjs
        return nouns, adjs

    def sample(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw ``n`` sequences of ``split`` (one of :data:`SPLITS`).

        Returns ``input_ids`` ``[n, 7]`` (last three masked), ``labels`` ``[n, 7]`` (-100 except
        the targets), ``targets`` ``[n, 3]`` and ``iwl_targets`` ``[n, 3]`` (the completion
        under swapped roles; differs from ``targets`` only for ``switch``).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        g = generator
        noun, adj = self._pair(split, n, g)
        cop = torch.full_like(noun, COP)
        first_form = torch.rand(n, generator=g) < 0.5
        prefix = torch.where(first_form[:, None], torch.stack([cop, adj, noun], 1), torch.stack([noun, cop, adj], 1))
        adj_suffix = torch.rand(n, generator=g) < 0.5

        def suffix(nn_, aa):
            return torch.where(
                adj_suffix[:, None], torch.stack([aa, aa, aa, aa], 1), torch.stack([nn_, aa, nn_, nn_], 1)
            )

        full = torch.cat([prefix, suffix(noun, adj)], 1)
        targets = full[:, -N_TARGETS:].clone()
        if split == "switch":  # the noun slot holds a memorised adjective, and vice versa
            mem_adj, mem_noun = noun, adj
            reads_adj = (full[:, 3] == mem_adj)[:, None]  # memory reads the suffix start as an adjective
            iwl = torch.where(reads_adj, torch.stack([mem_adj] * 3, 1), torch.stack([mem_adj, mem_noun, mem_noun], 1))
        else:
            iwl = targets.clone()
        input_ids = full.clone()
        input_ids[:, -N_TARGETS:] = MASK
        labels = torch.full_like(full, -100)
        labels[:, -N_TARGETS:] = targets
        return {"input_ids": input_ids, "labels": labels, "targets": targets, "iwl_targets": iwl}
