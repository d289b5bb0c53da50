"""Tasks: deterministic generation, disjoint splits, held-out templates, tokenizer checks, custom files."""
import copy
import json
import re

import pytest
import torch

import circuitbench
from circuitbench.errors import UserError
from circuitbench.tasks import TASKS, Examples, get_task
from circuitbench.tasks import boolexpr as bx
from circuitbench.tasks._common import GeneratedTask
from circuitbench.tasks.ioi import load_templates

SMALL = {"train": 60, "validation": 40, "test": 80}


@pytest.fixture(scope="module")
def tok():
    return circuitbench.load_model("random:gpt2-tiny").tokenizer


def fresh(name):
    """A task whose builds are not served from the process-wide cache."""
    GeneratedTask._cache.clear()
    return get_task(name)


def all_texts(splits):
    return {name: [t["clean"] for t in splits.split(name).texts] for name in splits.names}


def real_tokens(examples, i):
    n = int(examples.attention_mask[i].sum())
    return examples.clean[i, :n].tolist(), examples.corrupted[i, :n].tolist()


# ---- registry --------------------------------------------------------------------------------------
def test_registry_lists_the_paper_tasks():
    for name in ("ioi", "ioi-t1", "gt", "gp", "boolexpr-ip", "boolexpr-fs"):
        assert name in TASKS
        task = get_task(name)
        assert task.name == name and task.metrics and set(task.sizes) == {"train", "validation", "test"}
    assert get_task("ioi").sizes == {"train": 200, "validation": 200, "test": 36_084}
    assert get_task("gt").sizes == {"train": 150, "validation": 150, "test": 12_240}
    assert get_task("gp").sizes == {"train": 150, "validation": 150, "test": 378}
    assert get_task("boolexpr-fs").sizes == {"train": 3840, "validation": 767, "test": 3070}
    assert get_task("ioi-t1").sizes == {"train": 50, "validation": 50, "test": 50}


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="unknown task 'nope'.*ioi"):
        get_task("nope")
    with pytest.raises(UserError, match="custom task needs a file"):
        get_task("custom")


# ---- Examples ----------------------------------------------------------------------------------------
def test_examples_select_and_batches_trim_padding():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0], [5, 6, 7, 8]])
    mask = (ids != 0).long()
    ex = Examples(ids, ids.clone(), mask, (mask.sum(1) - 1).unsqueeze(1),
                  {"answer": torch.tensor([1, 2, 3])}, [{"clean": str(i)} for i in range(3)])
    sub = ex.select([1])
    assert sub.clean.tolist() == [[5, 6]] and sub.positions.tolist() == [[1]]
    assert sub.targets["answer"].tolist() == [2] and sub.texts == [{"clean": "1"}]
    batches = list(ex.batches(2))
    assert [b.clean.shape for b in batches] == [(2, 3), (1, 4)]
    shuffled = list(ex.batches(2, shuffle=True, seed=1))
    assert sorted(t["clean"] for b in shuffled for t in b.texts) == ["0", "1", "2"]
    with pytest.raises(ValueError):
        Examples(ids, ids[:2], mask, mask[:, :1], {}, [{}] * 3)


# ---- determinism and disjointness -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ioi", "ioi-t1", "gt", "gp", "boolexpr-ip", "boolexpr-fs"])
def test_generation_is_deterministic_and_splits_disjoint(tok, name):
    sizes = SMALL if name != "ioi-t1" else None
    a = fresh(name).build(tok, seed=3, sizes=sizes)
    b = fresh(name).build(tok, seed=3, sizes=sizes)
    c = fresh(name).build(tok, seed=4, sizes=sizes)
    for split in a.names:
        ea, eb = a.split(split), b.split(split)
        assert torch.equal(ea.clean, eb.clean) and torch.equal(ea.corrupted, eb.corrupted)
        assert ea.texts == eb.texts
        for key in ea.targets:
            assert torch.equal(ea.targets[key], eb.targets[key])
    assert all_texts(a) != all_texts(c)
    texts = all_texts(a)
    for split, clean in texts.items():
        assert len(set(clean)) == len(clean), f"duplicates within {split}"
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])


@pytest.mark.parametrize("name", ["ioi", "ioi-t1", "gt", "gp", "boolexpr-ip", "boolexpr-fs"])
def test_token_checks_hold(tok, name):
    splits = fresh(name).build(tok, sizes=SMALL if name != "ioi-t1" else None)
    for split in splits.names:
        ex = splits.split(split)
        assert len(ex) + splits.dropped[split] == (SMALL if name != "ioi-t1" else get_task(name).sizes)[split]
        # Clean and corrupted have the same token length, and the scored position is the last token.
        assert torch.equal(ex.attention_mask.sum(1) - 1, ex.positions[:, 0])
        for i in range(len(ex)):
            clean, corrupted = real_tokens(ex, i)
            assert len(clean) == len(corrupted)
            assert tok.decode(clean) == ex.texts[i]["clean"]
            assert tok.decode(corrupted) == ex.texts[i]["corrupted"]
        if "answer" in ex.targets:  # one token each, the text's answer
            for i in range(min(len(ex), 20)):
                assert tok.decode([int(ex.targets["answer"][i])]) == ex.texts[i]["answer"]
                assert tok.decode([int(ex.targets["wrong"][i])]) == ex.texts[i]["wrong"]


# ---- IOI ---------------------------------------------------------------------------------------------
def test_ioi_has_30_templates_and_test_templates_are_unseen(tok):
    rows = load_templates()
    assert len(rows) == 15
    splits = fresh("ioi").build(tok, sizes={"train": 400, "validation": 200, "test": 2000})
    used = {s: {(t["template"], t["order"]) for t in splits.split(s).texts} for s in splits.names}
    assert len(used["train"] | used["test"]) == 30
    assert sum(o == "ABBA" for _, o in used["train"] | used["test"]) == 15
    assert not used["test"] & (used["train"] | used["validation"])
    # Not even the base sentence of a test template is seen in training, in either order.
    assert not {t for t, _ in used["test"]} & {t for t, _ in used["train"] | used["validation"]}


def test_ioi_answers_and_corruption(tok):
    ex = fresh("ioi").build(tok, sizes=SMALL).test
    for t in ex.texts:
        a, b = t["answer"].strip(), t["wrong"].strip()
        clean_names = re.findall(r"[A-Z][a-z]+", t["clean"])
        assert clean_names.count(b) == 2 and clean_names.count(a) == 1
        assert t["clean"].endswith(" to") or t["clean"].endswith(" said to")
        # ABC corruption: the corrupted prompt has three fresh names, none of A or B.
        new = [w.strip(",.") for w, o in zip(t["corrupted"].split(), t["clean"].split()) if w != o]
        assert len(new) == 3 and len(set(new)) == 3 and not {a, b} & set(new)
    orders = {t["order"] for t in ex.texts}
    assert orders == {"ABBA", "BABA"}


def test_ioi_larger_train_extends_smaller(tok):
    small = fresh("ioi").build(tok, n_train=200).train
    large = fresh("ioi").build(tok, n_train=400).train
    assert large.texts[:200] == small.texts
    with pytest.raises(UserError, match="100,000"):
        get_task("ioi").build(tok, n_train=100_001)


def test_ioi_t1_uses_one_template(tok):
    splits = fresh("ioi-t1").build(tok)
    assert {t["template"] for s in splits.names for t in splits.split(s).texts} == {
        "When {X} and {Y} went to the {place}, {S} gave a {object} to"}
    assert [len(splits.split(s)) for s in splits.names] == [50, 50, 50]


def test_lazy_splits_build_on_demand(tok):
    splits = fresh("ioi").build(tok, sizes={"test": 3000})
    assert not splits.is_built("test")
    head = splits.head("test", 10)
    assert len(head) == 10 and not splits.is_built("test")
    assert len(splits.train) == 200 and not splits.is_built("test")
    assert head.texts == splits.test.texts[:10]


# ---- Greater-Than ------------------------------------------------------------------------------------
def test_gt_first_digit_variant_on_a_digit_tokenizer(tok):
    splits = fresh("gt").build(tok, sizes=SMALL)
    assert splits.variant == "first-digit"
    ex = splits.test
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert ex.targets["answer_ids"][0].tolist() == digits
    for i, t in enumerate(ex.texts):
        year = t["year"]
        assert ex.targets["threshold"][i] == (year % 100) // 10 >= 1
        assert t["clean"].endswith(f"the year {year // 100}")
        assert f"{year // 100}01" in t["corrupted"]
        last = tok.convert_ids_to_tokens(real_tokens(ex, i)[0][-2:])
        assert last == list(str(year // 100))
    assert ex.targets["window"].eq(1).all()


class TwoDigitTokenizer:
    """A GPT-2-like toy tokenizer: words with their leading space, numbers in two-digit chunks
    (" 1732" -> " 17", "32"), except " 1301", which is one token (an irregular year)."""

    pad_token_id = None
    eos_token_id = 0
    chat_template = None
    eos_token = bos_token = "<|endoftext|>"

    def __init__(self):
        self.vocab = {"<|endoftext|>": 0}

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab))

    def _encode(self, text):
        out = []
        for piece in re.findall(r" ?\d+| ?[A-Za-z']+| ?[^\sA-Za-z\d]+|\s+", text):
            if piece == " 1301" or not piece.strip().isdigit():
                out.append(self._id(piece))
                continue
            space, digits = (" ", piece[1:]) if piece.startswith(" ") else ("", piece)
            chunks = [digits[i:i + 2] for i in range(0, len(digits), 2)]
            out += [self._id((space if j == 0 else "") + c) for j, c in enumerate(chunks)]
        return out

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [self._encode(t) for t in texts]}

    def convert_ids_to_tokens(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return [inverse[i] for i in ids]


def test_gt_two_digit_variant_and_irregular_years_dropped():
    toy = TwoDigitTokenizer()
    splits = fresh("gt").build(toy, sizes={"train": 50, "validation": 50, "test": 400})
    assert splits.variant == "two-digit"
    ex = splits.test
    answers = ex.targets["answer_ids"][0].tolist()
    assert toy.convert_ids_to_tokens(answers) == [f"{k:02d}" for k in range(100)]
    years = [t["year"] for t in ex.texts]
    assert all(2 <= y % 100 <= 98 for y in years)
    assert ex.targets["threshold"].tolist() == [y % 100 for y in years]
    assert ex.targets["window"].eq(10).all()
    # Century 13's corrupted start year " 1301" is one token: those examples are dropped and counted.
    assert splits.dropped["test"] > 0 and not any(y // 100 == 13 for y in years)
    assert len(ex) + splits.dropped["test"] == 400


# ---- Gendered pronoun --------------------------------------------------------------------------------
def test_gp_answers_follow_gender_and_corruption_flips_it(tok):
    ex = fresh("gp").build(tok).test
    female = set(open(circuitbench.tasks._common.datasets_dir() / "names/female.txt").read().split())
    male = set(open(circuitbench.tasks._common.datasets_dir() / "names/male.txt").read().split())
    assert len(ex) == 378
    assert sum(t["gender"] == "female" for t in ex.texts) == 189
    for t in ex.texts:
        name = t["clean"].split()[1] if t["clean"].split()[0] in ("So", "Well,", "Honestly,") else t["clean"].split()[2]
        other = [w for w, o in zip(t["corrupted"].split(), t["clean"].split()) if w != o]
        assert t["answer"] == (" she" if t["gender"] == "female" else " he")
        assert name in (female if t["gender"] == "female" else male)
        assert len(other) == 1 and other[0] in (male if t["gender"] == "female" else female)


# ---- Boolean expressions -----------------------------------------------------------------------------
def test_boolexpr_expressions_obey_the_grammar(tok):
    ex = fresh("boolexpr-ip").build(tok, sizes=SMALL).train
    values = []
    for t in ex.texts:
        words = t["expression"].split()
        assert 3 <= sum(w in ("True", "False") for w in words) <= 6
        assert bx.max_depth(words) <= 3 and bx.max_consecutive_nots(words) <= 2
        value = bx.evaluate_words(words)
        assert t["answer"] == str(value)
        values.append(value)
    assert sum(values) == (len(values) + 1) // 2  # balanced (no drops on this tokenizer)
    # The corrupted expression differs in one literal and has the other value.
    splits = fresh("boolexpr-ip").build(tok, sizes=SMALL)
    for t in splits.test.texts:
        clean_words = t["expression"].split()
        corrupted_text = t["corrupted"]
        start = corrupted_text.index("user\n") + len("user\n")
        corrupted_words = corrupted_text[start:corrupted_text.index("<|im_end|>", start)].split()
        diff = [i for i, (a, b) in enumerate(zip(clean_words, corrupted_words)) if a != b]
        assert len(diff) == 1 and bx.evaluate_words(corrupted_words) != bx.evaluate_words(clean_words)


def test_evaluate_words_by_hand():
    assert bx.evaluate_words("not ( True ) and ( True )".split()) is False
    assert bx.evaluate_words("True or False and False".split()) is True  # and binds tighter
    assert bx.evaluate_words("not not ( not False )".split()) is True
    with pytest.raises(ValueError):
        bx.evaluate_words("__import__ ( 'os' )".split())


def test_boolexpr_uses_the_chat_template_when_there_is_one(tok):
    splits = fresh("boolexpr-fs").build(tok, sizes=SMALL)
    assert splits.variant == "chat-template"
    text = splits.test.texts[0]["clean"]
    assert text.count("<|im_start|>user") == 4 and text.endswith("<|im_start|>assistant\n")
    ip = fresh("boolexpr-ip").build(tok, sizes=SMALL).test.texts[0]["clean"]
    assert bx.SYSTEM in ip and ip.endswith("<|im_start|>assistant\n'")


def test_boolexpr_codellama_format_without_a_chat_template(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    ip = fresh("boolexpr-ip").build(plain, sizes=SMALL)
    assert ip.variant == "codellama-inst"
    t = ip.test.texts[0]
    assert t["clean"] == ("[INST] <<SYS>>\nEvaluate the following boolean expression as either 'True' or "
                          f"'False'.\n<</SYS>>\n\n{t['expression']} [/INST] '")
    fs = fresh("boolexpr-fs").build(plain, sizes=SMALL).test.texts[0]
    shots = re.findall(r"\[INST\] (.*?) is \[/INST\] (True|False)" + re.escape(plain.eos_token + plain.bos_token),
                       fs["clean"])
    assert len(shots) == 3 and {v for _, v in shots} == {"True", "False"}
    assert all(bx.evaluate_words(e.split()) == (v == "True") for e, v in shots)
    assert fs["clean"].endswith(f"[INST] {fs['expression']} is [/INST]") and fs["answer"] in (" True", " False")


# ---- custom JSONL ------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"clean": "When Mary and John went to the store, John gave a drink to",
        "corrupted": "When Alice and Bob went to the store, Bob gave a drink to",
        "answer": " Mary", "wrong_answer": " John"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", r":2: not valid JSON"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), r":2: missing field\(s\) answer"),
    (json.dumps({**GOOD, "split": "dev"}), r":2: split must be one of"),
    (json.dumps({**GOOD, "answer": 3}), r":2: field 'answer' must be a non-empty string"),
    (json.dumps([1, 2]), r":2: expected a JSON object"),
    (json.dumps({**GOOD, "extra": 1}), r":2: unknown field\(s\) extra"),
])
def test_custom_errors_name_the_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "task.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(UserError, match=message):
        get_task(f"custom:{path}")


def test_custom_missing_or_empty_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        get_task(f"custom:{tmp_path / 'none.jsonl'}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no examples"):
        get_task(f"custom:{tmp_path / 'empty.jsonl'}")


def test_custom_builds_splits_and_counts_drops(tok, tmp_path):
    rows = [{**GOOD, "split": "test"},
            {**GOOD, "split": "test", "answer": " Maryanne-Louise"},  # not one token: dropped
            {**GOOD, "split": "test", "corrupted": "When Alice and Bob went to the big store, Bob gave a drink to"}]
    rows += [{**GOOD, "clean": GOOD["clean"].replace("store", p), "corrupted": GOOD["corrupted"].replace("store", p)}
             for p in ("park", "school", "office", "garden", "house", "bank")]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    task = get_task(f"custom:{path}")
    assert task.sizes == {"train": 2, "validation": 2, "test": 5}
    splits = task.build(tok)
    assert splits.dropped == {"train": 0, "validation": 0, "test": 2}
    assert len(splits.test) == 3 and splits.test.texts[0]["line"] == 1
    assert tok.decode([int(splits.test.targets["answer"][0])]) == " Mary"
    assert {t["line"] for s in ("train", "validation") for t in splits.split(s).texts} | \
        {t["line"] for t in splits.test.texts} == {1, 4, 5, 6, 7, 8, 9}
    again = get_task(f"custom:{path}").build(tok)
    assert again.train.texts == splits.train.texts
    with pytest.raises(UserError, match="asked for 10 train"):
        task.build(tok, n_train=10)
