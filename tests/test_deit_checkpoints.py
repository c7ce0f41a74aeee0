"""Checkpoints both ways between this ``main.py`` and DeiT's (and so the original iRPE's) ``main.py``.

DeiT saves ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'}`` with ``torch.save``,
``args`` being the ``argparse.Namespace`` of its flags and ``scaler`` its ``NativeScaler``'s state. Its resume loads
``scaler`` into an enabled ``GradScaler`` and ``model_ema`` through timm's ``ModelEma``. The fixtures below build
such checkpoints with the same calls, and replay DeiT's resume on ours.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from timm.utils import ModelEma, get_state_dict

import main
from tools.make_synthetic_dataset import make_dataset

MODEL = "deit_tiny_patch16_224_ctx_product_50_shared_k"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, num_classes=2, train_per_class=4, val_per_class=1, image_size=32, seed=1)
    return root


def _base(data: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--data-path", str(data), "--device", "cpu", "--input-size", "32",
            "--batch-size", "2", "--num_workers", "0", "--epochs", "2", *extra]  # fmt: skip


def _deit_args(**overrides) -> argparse.Namespace:
    """DeiT's parsed flags (an argparse.Namespace, as DeiT stores it), from our parser: same names and defaults."""
    args = main.parse_args(["--model", MODEL, "--data-path", "x", "--input-size", "32", "--epochs", "2"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def save_like_deit(path: Path, model: torch.nn.Module, epoch: int, args: argparse.Namespace) -> None:
    """What DeiT's ``main.py`` writes after an epoch (``utils.save_on_master`` is a plain ``torch.save``)."""
    optimizer = create_optimizer(args, model)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    model_ema = ModelEma(model, decay=args.model_ema_decay, device="cpu")
    loss_scaler = torch.amp.GradScaler("cpu")  # NativeScaler's GradScaler; DeiT's is on CUDA, same class
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    optimizer.step()
    lr_scheduler.step(epoch)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "epoch": epoch,
            "model_ema": get_state_dict(model_ema),
            "scaler": loss_scaler.state_dict(),
            "args": args,
        },
        path,
    )


@pytest.fixture(scope="module")
def deit_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deit") / "checkpoint.pth"
    torch.manual_seed(0)
    save_like_deit(path, timm.create_model(MODEL, img_size=32, num_classes=2), 0, _deit_args())
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)  # what made our --resume fail before the Namespace was allowed
    return path


def test_resume_a_deit_checkpoint_continues_training(data, deit_checkpoint, tmp_path, capsys):
    assert main.cli(_base(data, "--resume", str(deit_checkpoint), "--output_dir", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "continuing at epoch 1" in out and "* Acc@1" in out
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_eval_resume_of_a_deit_checkpoint(data, deit_checkpoint, capsys):
    assert main.cli(_base(data, "--eval", "--resume", str(deit_checkpoint))) == 0
    assert "* Acc@1" in capsys.readouterr().out


def test_finetune_from_a_deit_checkpoint(data, deit_checkpoint, capsys):
    assert main.cli(_base(data, "--finetune", str(deit_checkpoint), "--epochs", "1")) == 0
    assert "Finetuning from" in capsys.readouterr().out


def test_teacher_from_a_deit_style_checkpoint(data, tmp_path, capsys):
    teacher = timm.create_model("resnet10t", num_classes=2, global_pool="avg")
    torch.save({"model": teacher.state_dict(), "args": _deit_args(model="resnet10t")}, tmp_path / "teacher.pth")
    argv = _base(data, "--distillation-type", "hard", "--teacher-model", "resnet10t", "--teacher-path",
                 str(tmp_path / "teacher.pth"), "--epochs", "1")[2:]  # fmt: skip
    assert main.cli(["--model", "deit_tiny_distilled_patch16_224", *argv]) == 0
    assert "* Acc@1" in capsys.readouterr().out


def test_our_checkpoint_resumes_in_deits_main(data, tmp_path, capsys):
    """DeiT's resume sequence (``torch.load`` with today's default ``weights_only=True``) on our checkpoint."""
    assert main.cli(_base(data, "--epochs", "1", "--output_dir", str(tmp_path))) == 0  # default recipe, EMA on
    capsys.readouterr()
    checkpoint = torch.load(tmp_path / "checkpoint.pth", map_location="cpu")
    args = _deit_args()
    model = timm.create_model(MODEL, img_size=32, num_classes=2)
    optimizer = create_optimizer(args, model)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    model_ema = ModelEma(model, decay=args.model_ema_decay, device="cpu")
    loss_scaler = torch.amp.GradScaler("cpu")

    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    assert checkpoint["epoch"] + 1 == 1
    buffer = io.BytesIO()  # DeiT's _load_checkpoint_for_ema
    torch.save({"state_dict_ema": checkpoint["model_ema"]}, buffer)
    buffer.seek(0)
    model_ema._load_checkpoint(buffer)
    loss_scaler.load_state_dict(checkpoint["scaler"])  # refuses None and {}: a run without loss scaling
    assert loss_scaler.get_scale() == 65536.0
    for k, v in checkpoint["model_ema"].items():  # loaded weights: exact copies
        torch.testing.assert_close(model_ema.ema.state_dict()[k], v, rtol=0, atol=0, msg=k)
