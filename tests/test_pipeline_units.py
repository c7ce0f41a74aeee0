"""In-process checks of the training pipeline: flags and --config, clear errors, atomic checkpoints, losses, plots.

These call ``main.cli`` directly (no subprocess), so each costs a fraction of a second to a few seconds.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import timm
import torch
import yaml

import main
import utils
from losses import DistillationLoss
from tolerances import assert_close_reduction
from tools.make_synthetic_dataset import make_dataset
from tools.plot_logs import plot_logs, read_log

MODEL = "deit_tiny_patch16_224_ctx_product_50_shared_k"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, num_classes=2, train_per_class=2, val_per_class=1, image_size=32, tar=True)
    return root


def _base(data: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--data-path", str(data), "--device", "cpu", "--input-size", "32",
            "--batch-size", "2", "--num_workers", "0", "--epochs", "1", *extra]  # fmt: skip


def _error(capsys, argv: list[str]) -> str:
    assert main.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------------------------
# Flags and --config


def test_deit_defaults():
    a = main.parse_args([])
    expected = dict(
        batch_size=64, epochs=300, input_size=224, drop=0.0, drop_path=0.1, model_ema=True, model_ema_decay=0.99996,
        model_ema_force_cpu=False, opt="adamw", opt_eps=1e-8, opt_betas=None, clip_grad=None, momentum=0.9,
        weight_decay=0.05, sched="cosine", lr=5e-4, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0,
        warmup_lr=1e-6, min_lr=1e-5, decay_epochs=30, warmup_epochs=5, cooldown_epochs=10, patience_epochs=10,
        decay_rate=0.1, color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", smoothing=0.1, train_interpolation="bicubic",
        repeated_aug=True, load_tar=False, reprob=0.25, remode="pixel", recount=1, resplit=False, mixup=0.8,
        cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
        teacher_model="regnety_160", teacher_path="", distillation_type="none", distillation_alpha=0.5,
        distillation_tau=1.0, finetune="", data_set="IMNET", inat_category="name", output_dir="",
        device="cuda" if torch.cuda.is_available() else "cpu",  # DeiT's is cuda; cpu where there is no GPU
        seed=0, resume="", start_epoch=0, eval=False, dist_eval=True, num_workers=10, pin_mem=True, world_size=1,
        dist_url="env://", attn_impl="auto", compile=False, amp=None, amp_dtype=None,
    )  # fmt: skip
    assert {k: getattr(a, k) for k in expected} == expected
    off = main.parse_args(["--no-model-ema", "--no-repeated-aug", "--no-pin-mem", "--no-dist-eval", "--no-amp"])
    assert not (off.model_ema or off.repeated_aug or off.pin_mem or off.dist_eval or off.amp)


def test_parser_is_reusable_as_parent():
    import argparse

    p = argparse.ArgumentParser(parents=[main.get_args_parser()])
    p.add_argument("--ngpus", type=int, default=8)
    a = p.parse_args(["--batch-size", "3", "--ngpus", "2"])
    assert a.batch_size == 3 and a.ngpus == 2


def test_config_yaml_defaults_and_cli_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch-size: 16\nlr: 1.0e-3\nwarmup_epochs: 2\nopt-betas: 0.9\nmixup: 0\nmodel-ema: false\n")
    a = main.parse_args(["--config", str(cfg), "--batch-size", "8"])
    assert a.batch_size == 8 and a.lr == 1e-3 and a.warmup_epochs == 2 and a.mixup == 0.0
    assert a.opt_betas == [0.9] and a.model_ema is False


def test_config_unknown_keys_are_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch-size: 16\nbatchsize: 3\nlearning_rate: 1\n")
    err = _error(capsys, ["--config", str(cfg)])
    assert "unknown key(s)" in err and "batchsize" in err and "learning_rate" in err
    cfg.write_text("data-set: MNIST\n")
    assert "argument --data-set: invalid choice: 'MNIST'" in _error(capsys, ["--config", str(cfg)])
    assert "cannot read config" in _error(capsys, ["--config", str(tmp_path / "none.yaml")])


def test_args_yaml_round_trips(tmp_path):
    a = main.parse_args(["--batch-size", "5", "--opt-betas", "0.8", "0.9"])
    main.prepare_output_dir(str(tmp_path), a)
    data = yaml.safe_load((tmp_path / "args.yaml").read_text())
    assert data["batch_size"] == 5 and data["opt_betas"] == [0.8, 0.9]
    b = main.parse_args(["--config", str(tmp_path / "args.yaml")])
    assert vars(b) | {"config": ""} == vars(a) | {"config": ""}


def test_amp_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert main.resolve_amp_dtype(main.parse_args([]), cpu) is None
    assert main.resolve_amp_dtype(main.parse_args([]), cuda) is torch.float16
    assert main.resolve_amp_dtype(main.parse_args(["--amp"]), cpu) is torch.bfloat16
    assert main.resolve_amp_dtype(main.parse_args(["--amp-dtype", "bfloat16"]), cuda) is torch.bfloat16
    assert main.resolve_amp_dtype(main.parse_args(["--no-amp"]), cuda) is None


# ----------------------------------------------------------------------------------------------------------------
# Clear errors (exit code 2, "error: ..." on stderr, no traceback)


def test_error_missing_data_path(capsys):
    assert "--data-path is required" in _error(capsys, ["--model", MODEL, "--device", "cpu", "--input-size", "32"])


def test_error_missing_split_folder(tmp_path, capsys):
    import shutil

    make_dataset(tmp_path, 2, 1, 1, 16)
    shutil.rmtree(tmp_path / "val")
    assert "val split folder not found" in _error(capsys, _base(tmp_path))


def test_error_empty_class_folder(tmp_path, capsys):
    make_dataset(tmp_path, 2, 1, 1, 16)
    (tmp_path / "val" / "n_void").mkdir()
    assert "n_void" in _error(capsys, _base(tmp_path))


def test_error_tar_without_class_folders(tmp_path, capsys):
    import tarfile

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with tarfile.open(tmp_path / "train.tar", "w") as tf:
        tf.add(tmp_path / "x.png", arcname="x.png")
    assert "outside class folders" in _error(capsys, _base(tmp_path, "--load-tar"))


def test_error_unreadable_image(tmp_path, capsys):
    make_dataset(tmp_path, 2, 2, 1, 32)
    bad = tmp_path / "train" / "n00000000" / "zz_corrupt.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    err = _error(capsys, _base(tmp_path, "--batch-size", "5", "--no-model-ema"))
    assert "cannot read image" in err and "zz_corrupt.jpg" in err


def test_error_unknown_model_suggests_names(data, capsys):
    err = _error(capsys, _base(data)[2:] + ["--model", "deit_tiny_patch16_224_ctx_product_50_shared"])
    assert "unknown model" in err and MODEL in err


def test_error_input_size_not_divisible(data, capsys):
    err = _error(capsys, _base(data) + ["--input-size", "40"])
    assert "not divisible by the patch size 16" in err


def test_error_checkpoint_from_another_model(data, tmp_path, capsys):
    other = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=2)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    err = _error(capsys, _base(data, "--eval", "--resume", str(tmp_path / "other.pth")))
    assert "does not match model" in err and "missing keys" in err and "rpe_k" in err


def test_error_cuda_without_gpu(data, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert "no CUDA GPU" in _error(capsys, _base(data) + ["--device", "cuda"])


def test_error_batch_larger_than_dataset(data, capsys):
    assert "lower --batch-size" in _error(capsys, _base(data) + ["--batch-size", "64"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        utils.atomic_torch_save({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"], "no temporary file left behind"
    utils.atomic_torch_save({"epoch": 3}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_to_plain_makes_args_weights_only_loadable(tmp_path):
    a = main.parse_args(["--opt-betas", "0.9", "0.99"])
    a.path = Path("/x")
    a.dtype = torch.bfloat16
    utils.atomic_torch_save({"args": utils.to_plain(a)}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)["args"]
    assert loaded["opt_betas"] == [0.9, 0.99] and loaded["path"] == "/x" and loaded["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------------------------
# Losses


def test_distillation_loss_modes():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    cls, dist = torch.randn(5, 3), torch.randn(5, 3)
    ce = torch.nn.CrossEntropyLoss()
    # without distillation the base criterion's own result
    torch.testing.assert_close(DistillationLoss(ce, None, "none", 0.5, 1.0)(x, cls, y), ce(cls, y), rtol=0, atol=0)
    hard = DistillationLoss(ce, teacher, "hard", 0.5, 1.0)(x, (cls, dist), y)
    expected = 0.5 * ce(cls, y) + 0.5 * ce(dist, teacher(x).argmax(1))
    assert_close_reduction(hard, expected, cls.numel())  # a cross-entropy sums every logit (the batch's classes)
    soft = DistillationLoss(ce, teacher, "soft", 0.3, 2.0)(x, (cls, dist), y)
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(dist / 2, 1), torch.log_softmax(teacher(x) / 2, 1), reduction="sum", log_target=True
    )
    assert_close_reduction(soft, 0.7 * ce(cls, y) + 0.3 * kl * 4 / dist.numel(), dist.numel())  # kl sums every logit
    with pytest.raises(ValueError, match="distill"):
        DistillationLoss(ce, teacher, "soft", 0.5, 1.0)(x, cls, y)
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(ce, None, "hard", 0.5, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Plots


def test_plot_logs_writes_png(tmp_path):
    logs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        lines = [
            {"epoch": e, "train_loss": 2 - e * 0.1, "train_lr": 1e-4 * e, "test_acc1": 10 * e, "test_acc5": 20 * e}
            for e in range(3)
        ]
        lines.append({**lines[-1], "test_acc1": 99})  # a resumed run repeats an epoch: the last entry wins
        (tmp_path / run / "log.txt").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        logs.append(tmp_path / run / "log.txt")
    assert read_log(logs[0])[-1]["test_acc1"] == 99 and len(read_log(logs[0])) == 3
    out = plot_logs(logs, tmp_path / "curves.png", labels=["base", "irpe"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tools.plot_logs import main as plot_main

    assert plot_main([str(logs[0]), "--out", str(tmp_path / "c2.png")]) == 0 and (tmp_path / "c2.png").is_file()
    assert plot_main([str(logs[0]), "--out", str(tmp_path / "c3.png"), "--labels", "x", "y"]) == 2


def test_logging_shows_info_on_rank_0_only(capsys):
    """INFO to stdout on rank 0 (what DeiT's print patch kept), warnings to stderr on every rank."""
    log = logging.getLogger("tests.logging")
    try:
        utils.setup_logging(rank=1)
        log.info("progress of rank 1")
        log.warning("rank 1 warns")
        utils.setup_logging(rank=0)  # again in one process: replaces the handlers, no line printed twice
        log.info("progress of rank 0")
        captured = capsys.readouterr()
    finally:
        utils.setup_logging(rank=0)
    assert captured.out == "progress of rank 0\n"
    assert captured.err == "warning: rank 1 warns\n"


# ----------------------------------------------------------------------------------------------------------------
# run_with_submitit.py


def test_submitit_launcher_reuses_the_parser_and_explains_missing_submitit(capsys):
    import importlib.util

    import run_with_submitit

    a = run_with_submitit.parse_args(["--nodes", "1", "--ngpus", "4", "--batch-size", "32", "--model", MODEL])
    assert a.nodes == 1 and a.ngpus == 4 and a.batch_size == 32 and a.epochs == 300
    if importlib.util.find_spec("submitit") is None:
        assert run_with_submitit.cli(["--nodes", "1"]) == 2
        assert "pip install submitit" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Training paths run in-process: non-finite loss, finetuning, distillation


def test_non_finite_loss_exits_1_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    real = main.train_one_epoch

    def nan_in_second_epoch(*args, **kwargs):
        if args[5] == 1:  # epoch
            raise utils.TrainingError("loss is nan at epoch 1, step 0: stopping training")
        return real(*args, **kwargs)

    monkeypatch.setattr(main, "train_one_epoch", nan_in_second_epoch)
    argv = _base(data, "--epochs", "2", "--output_dir", str(tmp_path))
    assert main.cli(argv) == 1
    assert "error: loss is nan" in capsys.readouterr().err
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 0


def test_engine_stops_on_non_finite_loss():
    import engine

    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    loader = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(utils.TrainingError, match="loss is nan"):
        engine.train_one_epoch(model, criterion, loader, opt, torch.device("cpu"), 0, None)


def test_finetune_from_a_checkpoint_of_another_size_and_head(data, tmp_path, capsys):
    src = timm.create_model(MODEL, img_size=64, num_classes=7)
    torch.save({"model": src.state_dict()}, tmp_path / "src.pth")
    argv = _base(data, "--finetune", str(tmp_path / "src.pth"))
    assert main.cli(argv) == 0
    out = capsys.readouterr().out
    assert "Not loading head.weight/bias: 7 classes in the checkpoint, 2 in the model" in out and "* Acc@1" in out
    assert "Resized position embedding: (4, 4) to (2, 2)" in out


def test_hard_distillation_with_a_teacher(data, tmp_path, capsys):
    teacher = timm.create_model("resnet10t", num_classes=2, global_pool="avg")
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    argv = _base(data, "--distillation-type", "hard", "--teacher-model", "resnet10t", "--teacher-path",
                 str(tmp_path / "teacher.pth"))[2:]  # fmt: skip
    assert main.cli(["--model", "deit_tiny_distilled_patch16_224", *argv]) == 0
    assert "* Acc@1" in capsys.readouterr().out
    assert "--teacher-path" in _error(capsys, ["--model", "deit_tiny_distilled_patch16_224", *argv[:-2]])


def test_eval_resume_from_a_url(data, tmp_path, monkeypatch, capsys):
    import functools
    import http.server
    import threading

    model = timm.create_model(MODEL, img_size=32, num_classes=2)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the server's access log off stderr
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ckpt.pth"
        assert main.cli(_base(data, "--eval", "--resume", url)) == 0
        assert "* Acc@1" in capsys.readouterr().out
        err = _error(capsys, _base(data, "--eval", "--resume", url + ".missing"))
        assert f"could not download {url}.missing: " in err and "HTTP Error 404" in err
    finally:
        server.shutdown()
        server.server_close()
