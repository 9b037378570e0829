"""SCD training and the Refiner stage on the shared trainer: losses go down, resume, ablations, checkpoints."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ovdense.cli import main
from ovdense.predictor import Segmenter
from ovdense.train.trainer import Trainer
from ovdense.weights import load_model
from test_train import config, csv_rows, voc_photo, write_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("scd") / "images")


def scd_config(images, out, **kw):
    return config(images, out, objective="scd", **kw)


@pytest.fixture(scope="module")
def refiner_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("refiner")
    trainer = Trainer.from_config(config(images, out, objective="refiner", epochs=5, lr=2e-3))  # 20 steps
    last = trainer.fit()
    return out, last, trainer


def test_refiner_stage_lowers_its_loss_and_keeps_the_tower(refiner_run):
    out, last, trainer = refiner_run
    losses = [float(r["refiner"]) for r in csv_rows(out / "log.csv")]
    assert len(losses) == 20
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    initial = load_model("ovdense-test-eva02").model.state_dict()
    for k, v in trainer.loaded.model.state_dict().items():
        assert torch.equal(initial[k], v.cpu()), k
    assert last.name == "refiner_epoch_5.safetensors"


def test_refiner_checkpoint_reloads_bit_identically(refiner_run):
    from ovdense.train.refiner import load_refiner, refined_dense_map

    _, last, trainer = refiner_run
    loaded = load_model("ovdense-test-eva02")
    refiner = load_refiner(last, tower=loaded.tower, model_name="ovdense-test-eva02")
    saved = load_file(str(last))
    for k, v in trainer.trained.state_dict().items():
        assert torch.equal(saved[k], v.cpu()), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = refined_dense_map(refiner, loaded.tower, x)
        b = refined_dense_map(trainer.trained.eval(), trainer.loaded.tower, x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("model", ["ovdense-test-eva02", "ovdense-test-vit"])
def test_twenty_scd_steps_lower_the_loss(images, tmp_path, model):
    out = tmp_path / "run"
    Trainer.from_config(scd_config(images, out, model=model, epochs=5)).fit()
    rows = list(csv_rows(out / "log.csv"))
    assert len(rows) == 20 and {"rla", "scd", "loss"} <= set(rows[0])
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    ckpt = out / "checkpoints" / "epoch_5.safetensors"
    seg = Segmenter.from_pretrained(model, checkpoint=ckpt, method="maskclip", device="cpu")
    seg.set_image(voc_photo())
    assert seg.predict("background; person; bottle").labels.shape == (375, 500)


def test_scd_resume_is_bit_identical(images, tmp_path):
    Trainer.from_config(scd_config(images, tmp_path / "a", epochs=1)).fit()
    Trainer.from_config(scd_config(images, tmp_path / "b", epochs=1, max_steps=2, save_every=2)).fit()
    Trainer.from_config(scd_config(images, tmp_path / "b", epochs=1, resume=str(tmp_path / "b"))).fit()
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "epoch_1.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "epoch_1.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ablation_switches(images, tmp_path, refiner_run):
    _, refiner_ckpt, _ = refiner_run
    rla = Trainer.from_config(scd_config(images, tmp_path / "rla", no_scd=True, max_steps=1, epochs=1))
    assert rla.objective.weights == {"rla": 1.0}
    rla.fit()
    assert "scd" not in next(csv_rows(tmp_path / "rla" / "log.csv"))
    sc = Trainer.from_config(scd_config(images, tmp_path / "sc", max_steps=1, epochs=1))
    r_sc = Trainer.from_config(scd_config(images, tmp_path / "rsc", refiner=str(refiner_ckpt), max_steps=1, epochs=1))
    off = Trainer.from_config(
        scd_config(images, tmp_path / "off", refiner=str(refiner_ckpt), no_refiner=True, max_steps=1, epochs=1)
    )
    assert sc.objective.refiner is None and off.objective.refiner is None and r_sc.objective.refiner is not None
    x = torch.randn(2, 3, 64, 64)
    plain, refined = sc.objective.target_tokens(x), r_sc.objective.target_tokens(x)
    assert plain.shape == refined.shape and plain.shape[:2] == (2, 16)
    assert not torch.allclose(plain, refined)  # R-SC-RLA targets the Refiner's tokens
    torch.testing.assert_close(off.objective.target_tokens(x), plain)
    # SCD keeps the last block's FFN trainable (its value-path head uses it); DeCLIP freezes it
    assert any("blocks.2.mlp" in n for n in sc.trainable)


def test_scd_cli_and_eval_regions(images, tmp_path, capsys, refiner_run):
    from panoptic_fixtures import make_panoptic

    _, refiner_ckpt, _ = refiner_run
    out = tmp_path / "s"
    argv = ["train", "scd", "--data", str(images), "--out", str(out), "--model", "ovdense-test-eva02",
            "--image-size", "64", "--batch-size", "2", "--workers", "0", "--epochs", "1",
            "--refiner", str(refiner_ckpt), "--scd-weight", "0.5"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == "scd" and cfg["scd_weight"] == 0.5 and cfg["refiner"] == str(refiner_ckpt)
    coco = make_panoptic(tmp_path / "coco")
    argv = ["eval-regions", "--data-root", str(coco.data_root), "--model", "ovdense-test-eva02", "--checkpoint",
            str(out / "checkpoints" / "epoch_1.safetensors"), "--method", "maskclip", "--image-size", "64",
            "--workers", "0", "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert set(json.loads((tmp_path / "r" / "metrics.json").read_text())) == {"box", "mask"}


def test_refiner_of_another_model_is_one_line(images, tmp_path, capsys, refiner_run):
    _, refiner_ckpt, _ = refiner_run
    argv = ["train", "scd", "--data", str(images), "--out", str(tmp_path / "s"), "--model", "ovdense-test-vit",
            "--image-size", "64", "--workers", "0", "--refiner", str(refiner_ckpt)]  # fmt: skip
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ovdense:")]
    assert len(lines) == 1 and "refiner" in lines[0].lower()
