"""Text side of the Optimus text VAE: sentences -> BERT token ids, GPT-2 token ids -> sentences.

Reproduces `optimus_vae_next.encode` / `.decode` and the app's `remove_duplicate_word` of the original code
(SHI-Labs/Versatile-Diffusion@cf0f4a2, lib/model_zoo/optimus.py and app.py) on top of transformers' tokenizers.
The vocabularies are the files the original repo ships (lib/model_zoo/optimus_models/vocab/), which are the hub's
`bert-base-cased` vocab.txt (28,996 pieces) and `gpt2` vocab.json + merges.txt (50,257 tokens); GPT-2 gets three
added tokens, <PAD> <BOS> <EOS> = 50257-50259.
"""

import json
from pathlib import Path

import torch
from torch import Tensor

from vd.checks import prompts

ENCODER_MAX_PIECES = 77  # word pieces kept per sentence, before [CLS] and [SEP] are added
ADDED_TOKENS = {"pad_token": "<PAD>", "bos_token": "<BOS>", "eos_token": "<EOS>"}  # in the original's order
# parity: the original decodes with pytorch-transformers 1.x `clean_up_tokenization`, applied in this order
# (" do not" really becomes " don't")
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class OptimusTokenizers:
    """The encoder's WordPiece tokenizer and the decoder's byte-level BPE one (transformers classes)."""

    def __init__(self, bert_vocab: dict[str, int], gpt2_vocab: dict[str, int], gpt2_merges: list[tuple[str, str]]):
        from transformers import BertTokenizer, GPT2Tokenizer  # here, not at import: transformers is slow to import

        # cased vocabulary, no lowercasing or accent stripping inside the tokenizer: encode_batch lowercases
        self.bert = BertTokenizer(vocab=bert_vocab, do_lower_case=False, strip_accents=False)
        self.gpt2 = GPT2Tokenizer(vocab=gpt2_vocab, merges=gpt2_merges)
        self.gpt2.add_special_tokens(dict(ADDED_TOKENS))
        n = len(gpt2_vocab)
        ids = [self.gpt2.convert_tokens_to_ids(t) for t in ADDED_TOKENS.values()]
        if ids != [n, n + 1, n + 2]:
            raise ValueError(f"gpt2 vocabulary: {list(ADDED_TOKENS.values())} got ids {ids}, expected "
                             f"{[n, n + 1, n + 2]} (a vocabulary that already holds them is not the original's)")
        self.pad_id, self.bos_id, self.eos_id = ids

    @classmethod
    def from_files(cls, bert_vocab: str | Path, gpt2_vocab: str | Path, gpt2_merges: str | Path) -> "OptimusTokenizers":
        """From a WordPiece vocab.txt (one piece per line) and a GPT-2 vocab.json + merges.txt."""
        lines = Path(bert_vocab).read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        bert = {piece: i for i, piece in enumerate(lines)}
        gpt2 = json.loads(Path(gpt2_vocab).read_text(encoding="utf-8"))
        merges = [line.split() for line in Path(gpt2_merges).read_text(encoding="utf-8").split("\n")]
        # the first line is the "#version" header, which the original skips without looking
        return cls(bert, gpt2, [(m[0], m[1]) for m in merges[1:] if len(m) == 2])

    @classmethod
    def from_pretrained(cls, bert: str | Path = "bert-base-cased", gpt2: str | Path = "gpt2") -> "OptimusTokenizers":
        """From hub repo ids or local folders holding vocab.txt (bert) and vocab.json + merges.txt (gpt2)."""
        def file(src: str | Path, name: str) -> Path:
            if Path(src).is_dir():
                return Path(src) / name
            from huggingface_hub import hf_hub_download
            return Path(hf_hub_download(str(src), name))

        return cls.from_files(file(bert, "vocab.txt"), file(gpt2, "vocab.json"), file(gpt2, "merges.txt"))

    def encode_batch(self, sentences: str | list[str]) -> tuple[Tensor, Tensor]:
        """Sentences -> (input_ids [B, T], attention_mask [B, T]) for `OptimusVAE.encode`.

        Each row is [CLS] + at most 77 word pieces + [SEP], right-padded with 0; the mask is id > 0."""
        rows = []
        for s in prompts("sentences", sentences):
            # parity: the original lowercases although the vocabulary is bert-base-cased; the released latents
            # (and the text UNet trained on them) come from lowercased pieces, so we do the same
            pieces = self.bert.encode(s.lower(), add_special_tokens=False)[:ENCODER_MAX_PIECES]
            rows.append([self.bert.cls_token_id, *pieces, self.bert.sep_token_id])
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return ids, (ids > 0).long()

    def decode(self, ids: list[int]) -> str:
        """GPT-2 ids from `OptimusVAE.generate` (<BOS> ... <EOS>) -> the sentence, as the original decodes it:
        detokenize, split on whitespace, drop the first and the last word (<BOS>, <EOS>), join with spaces."""
        text, run = "", []
        for token in self.gpt2.convert_ids_to_tokens([int(i) for i in ids]):
            if token in ADDED_TOKENS.values():
                # parity: added tokens are written apart, each after a space; byte-level runs are decoded alone
                text += (self.gpt2.convert_tokens_to_string(run) if run else "") + " " + token
                run = []
            else:
                run.append(token)
        text += self.gpt2.convert_tokens_to_string(run) if run else ""
        for old, new in _CLEAN_UP:
            text = text.replace(old, new)
        return " ".join(text.split()[1:-1])


_OPENING, _CLOSING, _GLUE = "([{", "?!.,:;}])", "<puncnext>"


def remove_duplicate_word(text: str) -> str:
    """Collapse immediately repeated word n-grams ("a cat a cat sat sat" -> "a cat sat"), as the original app
    cleans the sentences it shows.

    Words are split on single spaces, with brackets and punctuation at their ends split off as words of their
    own (glued back at the end). For n = 1, 2, ...: while some n words are directly followed by the same n words,
    the second copy of the first such repeat goes. Where the original crashes (an empty word, from a double,
    leading or trailing space), empty words are kept as words."""
    if text == "":
        return text
    words = _split_punctuation(text)
    n = 1
    while len(words) > n:
        while (i := _first_repeat(words, n)) is not None:
            del words[i + n:i + 2 * n]
        n += 1
    # parity: the original glues with one string replace, which leaves a leading or doubled marker in place
    return " ".join(words).replace(f" {_GLUE} ", "")


def _split_punctuation(text: str) -> list[str]:
    """"(yes!)" -> ["(", GLUE, "yes", GLUE, "!", GLUE, ")"]: GLUE marks where no space was."""
    out = []
    for word in text.split(" "):
        if not word:
            out.append(word)
            continue
        while word and word[0] in _OPENING:
            out += [word[0], _GLUE]
            word = word[1:]
        if not word:
            continue
        tail = []
        while word and word[-1] in _CLOSING:
            tail = [_GLUE, word[-1], *tail]
            word = word[:-1]
        out += ([word] if word else []) + tail
    return out


def _first_repeat(words: list[str], n: int) -> int | None:
    return next((i for i in range(len(words) - 2 * n + 1) if words[i:i + n] == words[i + n:i + 2 * n]), None)
