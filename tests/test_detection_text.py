import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ovdense.detection.text import (
    FVIT_TEMPLATES,
    fvit_class_embeddings,
    fvit_prompts,
    read_class_embeddings,
    select_class_embeddings,
    write_class_embeddings,
)
from ovdense.errors import InvalidArgumentError, OvdenseError

# sha256 of F-ViT's 63 templates (clip_utils.py `multiple_templates`), one per line, in their order.
FVIT_TEMPLATES_SHA256 = "93950afe1b680521d3ec1161d6576ce5288b26acb2263338329674abfb4160a1"


class Opaque:
    """A Python object a class-embedding file must never make us unpickle."""


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip()
    return message


# -- prompts ----------------------------------------------------------------------------------------------------


def test_templates_are_fvits_63():
    patterns = [t.pattern for t in FVIT_TEMPLATES]
    assert len(patterns) == 63 == len(set(patterns))
    assert hashlib.sha256("\n".join(patterns).encode()).hexdigest() == FVIT_TEMPLATES_SHA256


def test_prompts_person():
    prompts = fvit_prompts("person")
    assert len(prompts) == 63
    assert prompts[0] == "There is a person in the scene."
    assert prompts[1] == "There is the person in the scene."
    assert prompts[2] == "This is a photo of a person in the scene."
    assert prompts[5] == "itap of a person."
    assert prompts[6] == "itap of my person."
    assert prompts[8] == "This is a photo of a person."
    assert prompts[17] == "This is a photo of a nice person."
    assert prompts[52] == "This is the plastic person."
    assert prompts[59] == "This is an embroidered person."
    assert prompts[62] == "This is a painting of a person."


def test_prompts_article_follows_the_raw_name():
    prompts = fvit_prompts("apple")
    assert prompts[0] == "There is an apple in the scene."
    assert prompts[8] == "This is a photo of an apple."
    # Fixed "a" in a template stays "a" whatever the name.
    assert prompts[17] == "This is a photo of a nice apple."
    # The article tests the raw name's first character against lower-case vowels only (as clip_utils.article).
    assert fvit_prompts("Apple")[0] == "There is a apple in the scene."
    assert fvit_prompts("umbrella")[13] == "This is a good photo of an umbrella."


def test_prompts_processed_names():
    assert fvit_prompts("traffic_light")[0] == "There is a traffic light in the scene."
    assert fvit_prompts("hair drier/blow dryer")[8] == "This is a photo of a hair drier or blow dryer."
    # Objects365 writes " / ": both spaces stay (the authors' embeddings were made so).
    assert fvit_prompts("towel / napkin")[0] == "There is a towel  or  napkin in the scene."
    assert fvit_prompts("Christmas_tree")[10] == "This is a photo of the christmas tree."
    # Trailing dots go (all of them) after lower-casing; the article still sees the raw name.
    assert fvit_prompts("Band_Aid.")[0] == "There is a band aid in the scene."
    assert fvit_prompts("egg...")[0] == "There is an egg in the scene."


def test_this_is_prefix_rule():
    prompts = fvit_prompts("dog")
    prefixed = [p for p in prompts if p.startswith("This is ")]
    # All but the 2 "There is ..." and 3 "itap of ..." prompts start with "a", "an" or "the".
    assert len(prefixed) == 58
    for pattern, prompt in zip((t.pattern for t in FVIT_TEMPLATES), prompts, strict=True):
        assert prompt.startswith("This is ") == pattern.startswith(("a", "the"))
    assert not any(p.startswith("This is This") for p in prompts)


@pytest.mark.parametrize("name", ["", "   ", 3])
def test_prompts_refuse_bad_names(name):
    with pytest.raises(InvalidArgumentError):
        fvit_prompts(name)


# -- embeddings from a text tower --------------------------------------------------------------------------------


def _direct(model, tokenizer, name: str) -> torch.Tensor:
    with torch.no_grad():
        feats = model.encode_text(tokenizer(fvit_prompts(name))).float()
    feats = feats / feats.norm(dim=-1, keepdim=True)
    mean = feats.mean(dim=0)
    return mean / mean.norm()


def test_class_embeddings_match_direct_computation(tiny_vit):
    model, tokenizer = tiny_vit.model, tiny_vit.tokenizer
    names = ["person", "apple", "traffic_light", "hair drier/blow dryer"]
    emb = fvit_class_embeddings(model, tokenizer, names, batch_size=50)
    expected = torch.stack([_direct(model, tokenizer, n) for n in [*names, "background"]], dim=1)
    assert emb.shape == expected.shape == (expected.shape[0], len(names) + 1)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.norm(dim=0), torch.ones(len(names) + 1), atol=1e-6, rtol=0)
    no_bg = fvit_class_embeddings(model, tokenizer, names, background=False)
    assert no_bg.shape == (emb.shape[0], len(names))
    torch.testing.assert_close(no_bg, emb[:, :-1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("names", [[], ["cat", "cat"], ["cat", "background"], "cat"])
def test_class_embeddings_refuse_bad_name_lists(tiny_vit, names):
    with pytest.raises(InvalidArgumentError) as err:
        fvit_class_embeddings(tiny_vit.model, tiny_vit.tokenizer, names)
    _one_line(err)


# -- files ------------------------------------------------------------------------------------------------------


def _unit_columns(d: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(d, c, generator=g)
    return e / e.norm(dim=0, keepdim=True)


def test_write_read_select_round_trip(tmp_path):
    names = ["person", "traffic_light", "hair drier/blow dryer"]
    emb = _unit_columns(16, 4)
    path = tmp_path / "classes.pt"
    write_class_embeddings(path, names, emb)
    assert [p.name for p in tmp_path.iterdir()] == ["classes.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)  # F-ViT's format: a plain dict name -> vector
    assert list(raw) == [*names, "background"]
    table = read_class_embeddings(path)
    assert list(table) == [*names, "background"]
    for i, name in enumerate([*names, "background"]):
        assert table[name].shape == (16,) and table[name].dtype == torch.float32
        torch.testing.assert_close(table[name], emb[:, i], atol=0, rtol=0)
    torch.testing.assert_close(select_class_embeddings(table, names, 16, str(path)), emb, atol=1e-7, rtol=0)
    # A subset in another order: those columns, background still last.
    sub = select_class_embeddings(table, ["hair drier/blow dryer", "person"], None, str(path))
    torch.testing.assert_close(sub, emb[:, [2, 0, 3]], atol=1e-7, rtol=0)


def test_select_normalises_columns():
    table = {"cat": torch.tensor([3.0, 4.0]), "background": torch.tensor([0.0, 2.0])}
    out = select_class_embeddings(table, ["cat"], 2, "t.pt")
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.0], [0.8, 1.0]]))


def test_read_fvit_layout_views_and_safetensors(tmp_path):
    # F-ViT's files hold the rows of one (C+1) x D matrix: views sharing one storage.
    matrix = _unit_columns(8, 3).T.contiguous().to(torch.float64)
    names = ["cat", "dog", "background"]
    torch.save({n: matrix[i] for i, n in enumerate(names)}, tmp_path / "views.pt")
    table = read_class_embeddings(tmp_path / "views.pt")
    assert list(table) == names and all(v.dtype == torch.float32 and v.shape == (8,) for v in table.values())
    torch.testing.assert_close(torch.stack(list(table.values())), matrix.float())
    save_file({n: matrix[i].float().contiguous() for i, n in enumerate(names)}, str(tmp_path / "e.safetensors"))
    st = read_class_embeddings(tmp_path / "e.safetensors")
    assert set(st) == set(names)
    torch.testing.assert_close(st["dog"], table["dog"])


def _save_pickled_object(path):
    torch.save({"cat": torch.zeros(4), "background": Opaque()}, path)


def _save_raw_pickle(path):
    with open(path, "wb") as f:
        pickle.dump({"cat": Opaque()}, f)


@pytest.mark.parametrize(
    "make, words",
    [
        (_save_pickled_object, "Python objects"),
        (_save_raw_pickle, "safe loader"),
        (lambda p: torch.save({}, p), "empty"),
        (lambda p: torch.save([torch.zeros(4)], p), "not a dict"),
        (lambda p: torch.save({"cat": torch.zeros(2, 4)}, p), "not a dict"),
        (lambda p: torch.save({"cat": torch.zeros(4, dtype=torch.int64)}, p), "not a dict"),
        (lambda p: torch.save({"cat": [0.0, 1.0]}, p), "not a dict"),
        (lambda p: torch.save({1: torch.zeros(4)}, p), "not a dict"),
        (lambda p: torch.save({"cat": torch.zeros(4), "dog": torch.zeros(5)}, p), "widths"),
        (lambda p: torch.save({"cat": torch.tensor([0.0, float("nan")])}, p), "non-finite"),
        (lambda p: p.write_text("person 0.1 0.2\n"), "not a torch.save file"),
        (lambda p: p.write_bytes(b"PK\x03\x04broken"), "cannot read"),
    ],
)
def test_read_refusals(tmp_path, make, words):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(OvdenseError) as err:
        read_class_embeddings(path)
    message = _one_line(err)
    assert str(path) in message and words in message


def test_read_missing_file(tmp_path):
    with pytest.raises(OvdenseError) as err:
        read_class_embeddings(tmp_path / "nope.pt")
    assert "not found" in _one_line(err)


def test_select_refusals():
    table = {"cat": torch.ones(8), "dog": torch.ones(8), "background": torch.ones(8)}
    with pytest.raises(OvdenseError) as err:
        select_class_embeddings(table, ["cat"], 512, "emb.pt")
    assert _one_line(err).startswith("emb.pt holds 8-wide embeddings; the detector's classifier is 512-wide")
    with pytest.raises(OvdenseError) as err:
        select_class_embeddings({"cat": torch.ones(8)}, ["cat"], 8, "emb.pt")
    assert "no 'background' entry" in _one_line(err)
    with pytest.raises(OvdenseError) as err:
        select_class_embeddings(table, ["cat", "zebra", "yak"], 8, "emb.pt")
    message = _one_line(err)
    assert "'zebra' and 1 more" in message and "holds 2 class names" in message
    with pytest.raises(OvdenseError) as err:
        select_class_embeddings(table, ["cat", "background"], 8, "emb.pt")
    _one_line(err)


def test_write_refusals(tmp_path):
    with pytest.raises(InvalidArgumentError) as err:
        write_class_embeddings(tmp_path / "e.pt", ["cat", "dog"], torch.zeros(8, 2))
    assert "3" in _one_line(err)
    with pytest.raises(InvalidArgumentError):
        write_class_embeddings(tmp_path / "e.pt", ["cat"], torch.zeros(2, 8, 2))
    with pytest.raises(InvalidArgumentError):
        write_class_embeddings(tmp_path / "e.pt", ["cat", "cat"], torch.zeros(8, 3))
    assert not list(tmp_path.iterdir())
