"""Adversarial command lines and files: each is one ``error:`` line with a fix hint and exit code 2, no traceback.

One table of argv -> expected message. The flags are checked by ``main.validate_args`` before any data or model is
built, and checkpoints are read before the data, so most rows run ``main.cli`` in-process in milliseconds; the rows
marked ``needs_model`` build the data and the model (a second or two).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import main
from tools.make_synthetic_dataset import make_dataset

MODEL = "deit_tiny_patch16_224_ctx_product_50_shared_k"

# Configs: name -> YAML text (bytes: written as is).
CONFIGS: dict[str, str | bytes] = {
    "ema_string": 'model-ema: "no"\n',
    "batch_bool": "batch-size: true\n",
    "epochs_fraction": "epochs: 1.7\n",
    "epochs_list": "epochs: [1, 2]\n",
    "betas_bool": "opt-betas: [0.9, true]\n",
    "not_utf8": "model: d\xe9it\n".encode("latin-1"),
}

# (row id, argv with {data} / {ckpt:NAME} / {cfg:NAME} / {file} placeholders, expected message substring)
CASES = [
    ("epochs-0", ["--epochs", "0"], "argument --epochs: 0 is not an integer >= 1"),
    ("epochs-negative", ["--epochs", "-3"], "argument --epochs: -3 is not an integer >= 1"),
    ("smoothing-1", ["--smoothing", "1"], "argument --smoothing: 1 is not a rate in [0, 1)"),
    ("batch-size-0", ["--batch-size", "0"], "argument --batch-size: 0 is not an integer >= 1"),
    ("batch-size-negative", ["--batch-size", "-4"], "argument --batch-size: -4 is not an integer >= 1"),
    ("lr-nan", ["--lr", "nan"], "argument --lr: nan is not a finite number >= 0"),
    ("lr-negative", ["--lr", "-1"], "argument --lr: -1 is not a finite number >= 0"),
    ("input-size-0", ["--input-size", "0"], "argument --input-size: 0 is not an integer >= 1"),
    ("input-size-negative", ["--input-size", "-32"], "argument --input-size: -32 is not an integer >= 1"),
    ("input-size-8", ["--input-size", "8"], "--input-size 8 is not divisible by the patch size 16 of"),
    ("input-size-huge", ["--input-size", "99984"], "at most 4096 (1024 px) are supported"),
    ("input-size-2048", ["--input-size", "2048"], "--input-size 2048: 16384 patches of 16 px; at most 4096"),
    ("model-resnet18", ["--model", "resnet18"], "--model resnet18 is not a ViT-style model: only models with a patch"),
    ("drop-path-2", ["--drop-path", "2"], "argument --drop-path: 2 is not a rate in [0, 1)"),
    ("num-workers-negative", ["--num_workers", "-1"], "argument --num_workers: -1 is not an integer >= 0"),
    ("opt-unknown", ["--opt", "adamz"], "argument --opt: unknown optimizer 'adamz': did you mean"),
    ("opt-bad-prefix", ["--opt", "fast_adamw"], "unknown optimizer 'fast_adamw'"),
    ("sched-unknown", ["--sched", "cosinus"], "argument --sched: invalid choice: 'cosinus' (choose from 'cosine'"),
    ("output-dir-is-a-file", ["--output_dir", "{file}"], "is a file, not a directory"),
    ("eval-random-weights", ["--eval"], "--eval without --resume or --pretrained would evaluate randomly initialized"),
    ("attn-flex-cpu-training", ["--attn-impl", "flex"], "FlexAttention has no CPU backward): use auto, ops, sdpa"),
    ("resume-model-list", ["--resume", "{ckpt:model_list}"], "'model' must map parameter names to tensors, got a list"),
    ("resume-model-non-tensor", ["--resume", "{ckpt:model_str}"], "but 'w' holds a str"),
    ("resume-epoch-string", ["--resume", "{ckpt:epoch_str}"], "'epoch' must be a non-negative integer, got '3'"),
    ("resume-no-model", ["--resume", "{ckpt:no_model}"], "has no 'model' entry"),
    ("finetune-model-list", ["--finetune", "{ckpt:model_list}"], "'model' must map parameter names to tensors"),
    ("cfg-bool-string", ["--config", "{cfg:ema_string}"], "key 'model-ema': expected true or false, got 'no'"),
    ("cfg-int-bool", ["--config", "{cfg:batch_bool}"], "argument --batch-size: 'true' is not an integer"),
    ("cfg-int-fraction", ["--config", "{cfg:epochs_fraction}"], "argument --epochs: '1.7' is not an integer"),
    ("cfg-int-list", ["--config", "{cfg:epochs_list}"], "argument --epochs: '[1, 2]' is not an integer"),
    ("cfg-list-item", ["--config", "{cfg:betas_bool}"], "argument --opt-betas: 'true' is not a number"),
    ("cfg-not-utf8", ["--config", "{cfg:not_utf8}"], "is not UTF-8 text (byte 8: invalid continuation byte)"),
    # These get past the flags: the data and the model are built, then the checkpoint is checked against them.
    (
        "resume-optimizer-of-another-model",
        ["--resume", "{ckpt:other_optimizer}", "--epochs", "2"],  # its epoch 0 would be the last of --epochs 1
        "its optimizer state does not fit",
    ),
    ("finetune-other-architecture", ["--finetune", "{ckpt:resnet}"], "it is from another architecture"),
    ("finetune-shape-mismatch", ["--finetune", "{ckpt:wider_mlp}"], "weight shapes differ from " + MODEL),
]
NEEDS_MODEL = {"resume-optimizer-of-another-model", "finetune-other-architecture", "finetune-shape-mismatch"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The dataset, the checkpoints and the configs the table refers to."""
    root = tmp_path_factory.mktemp("cli_errors")
    make_dataset(root / "data", num_classes=2, train_per_class=2, val_per_class=1, image_size=32)
    out = {"data": root / "data", "file": root / "a_file"}
    out["file"].write_text("not a directory\n")
    sd = timm.create_model(MODEL, img_size=32, num_classes=2).state_dict()
    wider = dict(sd, **{"blocks.0.mlp.fc1.weight": torch.zeros(10, 192)})
    other_opt = torch.optim.AdamW(torch.nn.Linear(3, 3).parameters()).state_dict()
    ckpts = {
        "model_list": {"model": [1, 2, 3]},
        "model_str": {"model": {"w": "not a tensor"}},
        "epoch_str": {"model": sd, "epoch": "3"},
        "no_model": {"state": sd},
        "other_optimizer": {"model": sd, "optimizer": other_opt, "epoch": 0},
        "resnet": {"model": timm.create_model("resnet10t", num_classes=2).state_dict()},
        "wider_mlp": {"model": wider},
    }
    for name, ckpt in ckpts.items():
        out[f"ckpt:{name}"] = root / f"{name}.pth"
        torch.save(ckpt, out[f"ckpt:{name}"])
    for name, text in CONFIGS.items():
        out[f"cfg:{name}"] = root / f"{name}.yaml"
        data = text if isinstance(text, bytes) else text.encode()
        out[f"cfg:{name}"].write_bytes(data)
    return out


def _argv(files: dict[str, Path], extra: list[str]) -> list[str]:
    base = ["--model", MODEL, "--data-path", "{data}", "--device", "cpu", "--input-size", "32", "--batch-size", "2",
            "--num_workers", "0", "--epochs", "1"]  # fmt: skip
    out = []
    for a in base + extra:
        out.append(str(files[a[1:-1]]) if a.startswith("{") and a.endswith("}") else a)
    return out


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_adversarial_input_is_one_error_line(files, capsys, argv, expected, request):
    assert main.cli(_argv(files, argv)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err
    assert "Traceback" not in captured.err
    if request.node.callspec.id not in NEEDS_MODEL:
        assert "Creating model" not in captured.out and "data:" not in captured.out, "checked too late"


def test_eval_random_init_is_allowed_when_asked(files, capsys):
    assert main.cli(_argv(files, ["--eval", "--eval-random-init"])) == 0
    assert "* Acc@1" in capsys.readouterr().out
