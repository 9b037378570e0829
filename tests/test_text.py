import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

from ovdense import text as text_mod
from ovdense.classes import parse_class_string, read_class_file
from ovdense.text import (
    OPENAI_TEMPLATES,
    TextClassifier,
    build_text_classifier,
    default_cache_dir,
    encode_prompts,
    flatten_classes,
    text_tower_digest,
)

PROMPTS = [
    "a cat",
    "a photo of a dog.",
    "a bad photo of the person in a shirt standing next to a very tall tree.",
    "sky",
    "a rendering of a large red double-decker bus.",
    "x",
    "a low resolution photo of my small wooden table.",
]
TEMPLATES = OPENAI_TEMPLATES[:5]


def _make(cls=CLIP, seed=0, **text_kw):
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2, **text_kw)
    return cls(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def _text_transformer(model):
    return model.text.transformer if isinstance(model, CustomTextCLIP) else model.transformer


class _Recorder:
    """Context lengths seen by the text transformer, one per forward."""

    def __init__(self, model):
        self.lengths = []
        self._handle = _text_transformer(model).register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.lengths.append(args[0].shape[1])

    def close(self):
        self._handle.remove()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module", params=[CLIP, CustomTextCLIP], ids=["CLIP", "CustomTextCLIP"])
def model(request):
    return _make(request.param)


# -- encode_prompts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [256, 3])
def test_encode_prompts_matches_full_length_and_truncates(model, tokenizer, batch_size):
    with torch.no_grad():
        reference = model.encode_text(tokenizer(PROMPTS))
    rec = _Recorder(model)
    try:
        out = encode_prompts(model, tokenizer, PROMPTS, batch_size=batch_size)
    finally:
        rec.close()
    assert out.shape == reference.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    eot = tokenizer(PROMPTS).argmax(-1)
    assert len(rec.lengths) == -(-len(PROMPTS) // batch_size)
    assert max(rec.lengths) == int(eot.max()) + 1 < 77
    if batch_size < len(PROMPTS):
        # Prompts are grouped by length, so the shortest batch is cut shorter than the longest.
        assert min(rec.lengths) < max(rec.lengths)


@pytest.mark.parametrize("text_kw", [{"no_causal_mask": True}, {"pool_type": "last"}], ids=["bidir", "last"])
def test_non_causal_or_other_pooling_runs_full_length(tokenizer, text_kw):
    model = _make(CLIP, **text_kw)
    assert text_mod._truncatable_text_tower(model) is None
    with torch.no_grad():
        reference = model.encode_text(tokenizer(PROMPTS))
    rec = _Recorder(model)
    try:
        out = encode_prompts(model, tokenizer, PROMPTS, batch_size=4)
    finally:
        rec.close()
    assert set(rec.lengths) == {77}
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_eos_pooling_truncates_exactly(tokenizer):
    model = _make(CustomTextCLIP, pool_type="eos", eos_id=49407)
    assert text_mod._truncatable_text_tower(model) is not None
    with torch.no_grad():
        reference = model.encode_text(tokenizer(PROMPTS))
    torch.testing.assert_close(encode_prompts(model, tokenizer, PROMPTS), reference, atol=1e-5, rtol=0)


def test_encode_prompts_restores_training_flag(tokenizer):
    model = _make(CLIP).train()
    encode_prompts(model, tokenizer, PROMPTS[:2])
    assert model.training and model.transformer.training


# -- classifier -------------------------------------------------------------------------------------


def test_classifier_matches_formula(model, tokenizer):
    classes = [["sky"], ["person", "person in shirt"], ["tree"]]
    clf = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=False)
    assert isinstance(clf, TextClassifier)
    assert clf.num_classes == 3
    assert clf.class_names == classes
    assert clf.name_to_class.tolist() == [0, 1, 1, 2]
    assert clf.name_to_class.dtype == torch.long
    names = ["sky", "person", "person in shirt", "tree"]
    expected = []
    with torch.no_grad():
        for name in names:
            e = F.normalize(model.encode_text(tokenizer([t(name) for t in TEMPLATES])), dim=-1)
            expected.append(F.normalize(e.mean(0), dim=-1))
    expected = torch.stack(expected)
    assert clf.embeddings.shape == (4, 32) and clf.embeddings.dtype == torch.float32
    torch.testing.assert_close(clf.embeddings, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(clf.embeddings.norm(dim=-1), torch.ones(4))


def test_classifier_accepts_class_string_and_format_templates(tokenizer):
    model = _make(CLIP)
    a = build_text_classifier(model, tokenizer, "sky; tree", templates=["a photo of a {}."], cache_dir=False)
    b = build_text_classifier(
        model, tokenizer, [["sky"], ["tree"]], templates=[lambda c: f"a photo of a {c}."], cache_dir=False
    )
    torch.testing.assert_close(a.embeddings, b.embeddings)


def test_default_templates_are_the_80_openai_ones():
    assert len(OPENAI_TEMPLATES) == 80
    assert OPENAI_TEMPLATES[0]("cat") == "a bad photo of a cat."


# -- cache ------------------------------------------------------------------------------------------


def _files(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_cache_hit_skips_text_tower(model, tokenizer, tmp_path):
    classes = [["sky"], ["person", "person in shirt"]]
    first = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    files = _files(tmp_path)
    assert len(files) == 3 and all(f.endswith(".safetensors") for f in files)  # one file per name
    rec = _Recorder(model)
    try:
        second = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    finally:
        rec.close()
    assert rec.lengths == []
    assert torch.equal(first.embeddings, second.embeddings)
    assert torch.equal(first.name_to_class, second.name_to_class)
    assert second.class_names == classes
    assert _files(tmp_path) == files


def test_a_new_class_list_computes_only_its_new_names(model, tokenizer, tmp_path):
    first = build_text_classifier(model, tokenizer, [["sky"], ["tree"]], templates=TEMPLATES, cache_dir=tmp_path)
    rec = _Recorder(model)
    try:
        second = build_text_classifier(
            model, tokenizer, [["tree"], ["car", "sky"]], templates=TEMPLATES, cache_dir=tmp_path
        )
    finally:
        rec.close()
    assert len(rec.lengths) == 1  # one batch: the templates of "car" only
    fresh = build_text_classifier(model, tokenizer, [["car"]], templates=TEMPLATES, cache_dir=False)
    torch.testing.assert_close(second.embeddings[1], fresh.embeddings[0], rtol=0, atol=1e-6)
    assert torch.equal(second.embeddings[0], first.embeddings[1]) and torch.equal(
        second.embeddings[2], first.embeddings[0]
    )
    assert len(_files(tmp_path)) == 3


def test_cache_key_depends_on_model_templates_and_names(tokenizer, tmp_path):
    classes = [["sky"], ["tree"]]
    m0, m1 = _make(CLIP, seed=0), _make(CLIP, seed=1)
    build_text_classifier(m0, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    build_text_classifier(m1, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 4
    build_text_classifier(m0, tokenizer, classes, templates=OPENAI_TEMPLATES[5:8], cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 6
    build_text_classifier(m0, tokenizer, [["tree"], ["sky"]], templates=TEMPLATES, cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 6  # the same names: cached whatever their order
    build_text_classifier(m0, tokenizer, [["tree"], ["sea"]], templates=TEMPLATES, cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 7


def test_corrupt_cache_file_is_rewritten(tokenizer, tmp_path):
    model = _make(CLIP)
    classes = [["sky"]]
    good = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="is damaged"):
        again = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    torch.testing.assert_close(again.embeddings, good.embeddings)
    assert _files(tmp_path) == [path.name]
    rec = _Recorder(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            third = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    finally:
        rec.close()
    assert rec.lengths == []
    assert torch.equal(third.embeddings, again.embeddings)


def test_altered_cache_values_are_recomputed_with_a_warning(tokenizer, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _make(CLIP)
    classes = [["sky"]]
    good = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        stored = f.get_tensor("embeddings")
    assert metadata["digest"] == text_mod.embeddings_digest(stored)
    altered = stored.clone()
    altered[0, 0] += 1e-3  # a changed value under the old digest: a well-formed file with wrong numbers
    save_file({"embeddings": altered}, str(path), metadata=metadata)
    with pytest.warns(UserWarning, match="do not match the digest"):
        again = build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)
    assert torch.equal(again.embeddings, good.embeddings)
    with safe_open(str(path), framework="pt") as f:  # rewritten with the right values
        assert torch.equal(f.get_tensor("embeddings"), good.embeddings)
    save_file({"embeddings": stored}, str(path), metadata={"names": metadata["names"]})
    with pytest.warns(UserWarning, match="no digest recorded"):
        build_text_classifier(model, tokenizer, classes, templates=TEMPLATES, cache_dir=tmp_path)


def test_unwritable_cache_warns_once_and_runs_uncached(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(text_mod, "_UNWRITABLE_CACHES", set())
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    model = _make(CLIP)
    with pytest.warns(UserWarning, match=r"cache .*file/text cannot be written .*running without it"):
        first = build_text_classifier(model, tokenizer, [["sky"]], templates=TEMPLATES, cache_dir=blocked / "text")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = build_text_classifier(model, tokenizer, [["tree"]], templates=TEMPLATES, cache_dir=blocked / "text")
    assert first.embeddings.shape == second.embeddings.shape == (1, 32)
    assert blocked.read_text() == "not a folder"


def test_segmenter_passes_cache_warnings_on(tiny_vit, tmp_path):
    from ovdense.predictor import Segmenter
    from ovdense.presets import get_preset

    seg = Segmenter(tiny_vit, get_preset("sclip"), torch.device("cpu"), text_cache_dir=tmp_path)
    seg.text_classifier("sky")
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"garbage")
    fresh = Segmenter(tiny_vit, get_preset("sclip"), torch.device("cpu"), text_cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="is damaged"):
        fresh.text_classifier("sky; tree")
    with pytest.warns(UserWarning, match="can never be predicted") as record:
        fresh.text_classifier("sky, bed; tree; bed")
    assert len([w for w in record if "can never be predicted" in str(w.message)]) == 1


def test_cache_disabled_writes_nothing(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    model = _make(CLIP)
    build_text_classifier(model, tokenizer, [["sky"]], templates=TEMPLATES, cache_dir=False)
    assert not default_cache_dir().exists()


def test_default_cache_dir_follows_env(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"
    build_text_classifier(_make(CLIP), tokenizer, [["sky"]], templates=TEMPLATES)
    assert len(_files(tmp_path / "text")) == 1
    monkeypatch.delenv("OVDENSE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ovdense" / "text"


def test_digest_covers_only_the_text_tower():
    for cls in (CLIP, CustomTextCLIP):
        a, b = _make(cls, seed=0), _make(cls, seed=0)
        assert text_tower_digest(a) == text_tower_digest(b)
        with torch.no_grad():
            next(b.visual.parameters()).add_(1.0)
        assert text_tower_digest(a) == text_tower_digest(b)
        with torch.no_grad():
            _text_transformer(b).resblocks[0].mlp.c_fc.weight[0, 0] += 1e-3
        assert text_tower_digest(a) != text_tower_digest(b)
    assert text_tower_digest(_make(CLIP, seed=0)) != text_tower_digest(_make(CLIP, seed=1))


# -- parsing ----------------------------------------------------------------------------------------


def test_parse_class_string():
    assert parse_class_string("sky; person, person in shirt; tree") == [
        ["sky"],
        ["person", "person in shirt"],
        ["tree"],
    ]
    assert parse_class_string("  cat  ") == [["cat"]]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("sky;; tree", "class 1 is empty"),
        ("sky; tree;", "class 2 is empty"),
        ("sky, ; tree", "empty name"),
        ("sky; tree; sky", "duplicate class 'sky'"),
        ("tree, sky; sky, tree", "duplicate class 'sky' .classes 0 and 1."),
        ("person, man, person; dog", "duplicate name 'person' in class 0"),
    ],
)
def test_parse_class_string_errors(text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_class_string(text)
    assert "\n" not in str(info.value)


def test_a_name_in_two_classes_is_kept_as_sclip_does():
    # SCLIP's COCO-Object has 'bed' among the background words (class 0) and as class 60.
    with pytest.warns(UserWarning, match="class 2 .'bed'. can never be predicted"):
        classes = parse_class_string("sky, bed, wall; person; bed")
    names, name_to_class = flatten_classes(classes)
    assert names == ["sky", "bed", "wall", "person", "bed"]
    assert name_to_class.tolist() == [0, 0, 0, 1, 2]


def test_read_class_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("sky\n\nperson, person in shirt\n   \ntree\n", encoding="utf-8")
    assert read_class_file(path) == [["sky"], ["person", "person in shirt"], ["tree"]]


def test_read_class_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_class_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        read_class_file(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("sky\ntree\nsky\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup.txt.*duplicate class 'sky'"):
        read_class_file(dup)
    blank_name = tmp_path / "blank.txt"
    blank_name.write_text("sky,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank.txt.*empty name"):
        read_class_file(blank_name)


def test_flatten_classes():
    names, idx = flatten_classes([["a"], ["b", "c"], ["d"]])
    assert names == ["a", "b", "c", "d"]
    assert idx.dtype == torch.long and idx.tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        flatten_classes([])
