"""``rpe_vision_transformer.add_irpe``: iRPE retrofitted into timm's own ViTs, and ``main.py --irpe`` fine-tuning one.

Tiny models (embed_dim 32, depth 2, 32 px inputs: a 4x4 grid of 8-px patches) of each kind add_irpe covers: class
token, global pooling without one, register tokens, the distilled DeiT, ``dynamic_img_size`` (two grids), and qk-norm
with layer scale and MAP pooling. Exact comparisons run in float64, where every attention path agrees with the
explicit formulation to rounding. The ``main.py`` runs use timm's ``vit_tiny_patch16_224`` at 48 px, its
``--pretrained`` weights coming from a local Hugging Face cache (``HF_HUB_OFFLINE=1``), as on an offline node.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from torch.export import Dim

import irpe
import irpe_attention
import main
import rpe_models  # noqa: F401  (registers the iRPE models)
from rpe_vision_transformer import DistilledVisionTransformer, IRPESpec, RPEAttention, VisionTransformer, add_irpe
from tools.make_synthetic_dataset import make_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
# Each kind add_irpe covers: (timm model name, its constructor overrides).
KINDS = {
    "class_token": ("vit_tiny_patch16_224", {}),
    "global_pool": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4, no_embed_class=True)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dynamic_img_size": ("vit_tiny_patch16_224", dict(dynamic_img_size=True)),
    "qk_norm_ls_map": ("vit_tiny_patch16_224", dict(qk_norm=True, init_values=0.1, global_pool="map")),
}
# Inputs per kind: a dynamic_img_size model also runs on a 6x3 grid it was not built for.
SIZES = {"dynamic_img_size": [(32, 32), (48, 24)]}
# float64: the paths differ in the order of sums of at most 128 terms (the MLP's width; 21 keys, head_dim 16), on
# activations of order 1 through 2 blocks, so by a few hundred eps (2.2e-16); 1e-10 leaves a margin of 1e4.
TOL64 = dict(rtol=1e-10, atol=1e-10)


def _ops_usable() -> bool:
    return irpe_attention._compiled_usable("ops", torch.device("cpu"))[0]


FUSED = ["sdpa", pytest.param("ops", marks=pytest.mark.skipif(not _ops_usable(), reason="rpe_ops is not built"))]


def _timm_model(kind: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """The plain timm model of ``kind``, float64, in eval mode."""
    name, overrides = KINDS[kind]
    torch.manual_seed(seed)
    return timm.create_model(name, **TINY, **overrides, **kwargs).double().eval()


def _images(kind: str, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sizes = SIZES.get(kind, [(32, 32)])
    return [torch.randn(batch, 3, h, w, generator=generator, dtype=torch.float64) for h, w in sizes]


def _randomize_tables(model: torch.nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rpe_" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5)


def _rpe_keys(keys) -> set[str]:
    return {k for k in keys if ".rpe_" in k}


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_tables_equal_the_timm_model(kind: str) -> None:
    """Fresh (zero) tables: the retrofitted model computes what the timm model computed, at every input size."""
    plain = _timm_model(kind)
    model = add_irpe(copy.deepcopy(plain), rpe_on="qkv")
    assert isinstance(model, DistilledVisionTransformer if kind == "distilled" else VisionTransformer)
    assert all(isinstance(block.attn, RPEAttention) for block in model.blocks)
    assert all(m.rpe_config.skip == plain.num_prefix_tokens for m in model.modules() if isinstance(m, irpe.iRPE))
    with torch.no_grad():
        for x in _images(kind):
            torch.testing.assert_close(model(x), plain(x), **TOL64)


@pytest.mark.parametrize("kind", ["registers", "dynamic_img_size"])
@pytest.mark.parametrize("spec", ["product,ctx,qkv", "cross,bias,qk,shared_head=false", "euc,ctx,kv,ratio=3"])
@pytest.mark.parametrize("attn_impl", FUSED)
def test_fused_paths_equal_math_with_random_tables(kind: str, spec: str, attn_impl: str) -> None:
    """Random tables: each fused path gives the explicit formulation's logits and table gradients."""
    plain = _timm_model(kind)
    kwargs = asdict(IRPESpec.parse(spec))
    fused = add_irpe(copy.deepcopy(plain), **kwargs, attn_impl=attn_impl)
    _randomize_tables(fused)
    reference = add_irpe(copy.deepcopy(plain), **kwargs, attn_impl="math")
    reference.load_state_dict(fused.state_dict())
    for x in _images(kind):
        outputs = []
        for model in (fused, reference):
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
            tables = {n: p.grad for n, p in model.named_parameters() if ".rpe_" in n}
            outputs.append((out, tables))
        torch.testing.assert_close(outputs[0], outputs[1], **TOL64)
        assert not torch.allclose(outputs[0][0], plain(x)), "the tables changed nothing"


def test_gradients_reach_the_tables_in_training() -> None:
    """A float32 training step with gradient checkpointing: every parameter, zero tables included, gets a gradient."""
    torch.manual_seed(0)
    model = add_irpe(timm.create_model("vit_tiny_patch16_224", **TINY, drop_path_rate=0.1), rpe_on="qkv")
    model.set_grad_checkpointing(True)
    model.train()
    x = torch.randn(3, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    tables = [n for n, p in model.named_parameters() if ".rpe_" in n]
    assert len(tables) == 3 * TINY["depth"]
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in tables)


def test_equals_the_projects_own_irpe_model() -> None:
    """timm's DeiT-Tiny retrofitted is this project's iRPE DeiT-Tiny: same keys (strict load) and outputs."""
    small = dict(img_size=32, depth=2, num_classes=5, dynamic_img_size=True)
    torch.manual_seed(0)
    retrofitted = add_irpe(timm.create_model("deit_tiny_patch16_224", **small).double().eval(), attn_impl="math")
    _randomize_tables(retrofitted)
    zoo = timm.create_model("deit_tiny_patch16_224_ctx_product_50_shared_k", **small).double().eval()
    zoo.load_state_dict(retrofitted.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(retrofitted(x), zoo(x), **TOL64)


def test_pretrained_weights_and_timm_checkpoints_load(tmp_path: Path) -> None:
    """A pretrained timm model (local weights file) keeps its weights under their names; its checkpoint loads into
    the retrofitted model missing only the tables, and the retrofitted state dict loads back into timm's model once
    the tables are dropped."""
    source = _timm_model("registers").float()
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    overlay = dict(file=str(tmp_path / "weights.pth"), num_classes=TINY["num_classes"])
    name, overrides = KINDS["registers"]
    pretrained = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **TINY, **overrides)
    model = add_irpe(pretrained.eval(), rpe_on="qk")
    state = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(state[key], value), key
    incompatible = model.load_state_dict(source.state_dict(), strict=False)
    assert not incompatible.unexpected_keys
    assert set(incompatible.missing_keys) == _rpe_keys(state) == _rpe_keys(incompatible.missing_keys)
    assert len(_rpe_keys(state)) == 2 * TINY["depth"]
    source.load_state_dict({k: v for k, v in state.items() if k not in _rpe_keys(state)}, strict=True)


def test_export_with_a_dynamic_batch(tmp_path: Path) -> None:
    """torch.export of a retrofitted model (random tables, non-square grid): saved, loaded, right at other batches."""
    torch.manual_seed(0)
    model = add_irpe(timm.create_model("vit_tiny_patch16_224", **TINY, dynamic_img_size=True).eval(), rpe_on="qk")
    _randomize_tables(model)
    x = torch.randn(2, 3, 32, 48)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 32, 48)
            # float32 (eps 1.2e-7): the program runs the eager kernels, at most reordering sums of <= 128 terms
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_forward_intermediates_and_features_only() -> None:
    """forward_intermediates gives the input's grid; a features_only model retrofitted equals timm's features."""
    model = add_irpe(_timm_model("dynamic_img_size"), rpe_on="qkv")
    x = torch.randn(2, 3, 48, 24, dtype=torch.float64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=2)
    assert final.shape == (2, 1 + 18, 32) and [y.shape for y in intermediates] == [(2, 32, 6, 3)] * 2
    name, overrides = KINDS["dynamic_img_size"]
    torch.manual_seed(0)
    features = timm.create_model(name, **TINY, **overrides, features_only=True, out_indices=(0, 1)).double().eval()
    retrofitted = add_irpe(copy.deepcopy(features), rpe_on="qkv")
    assert isinstance(retrofitted.model, VisionTransformer)
    with torch.no_grad():
        torch.testing.assert_close(retrofitted(x), features(x), **TOL64)
        _randomize_tables(retrofitted)
        assert [y.shape for y in retrofitted(x)] == [(2, 32, 6, 3)] * 2


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("swin_tiny_patch4_window7_224", {}, "windowed or hierarchical attention"),
        ("eva02_tiny_patch14_224", {}, "is not timm's VisionTransformer"),
        ("vit_base_patch16_rpn_224", {}, "block 0 is ResPostBlock with Attention, not timm's Block"),
        ("vit_small_patch16_18x2_224", {}, "block 0 is ParallelThingsBlock, not timm's Block"),
        ("vit_small_r26_s32_224", {}, "its patch embedding is HybridEmbed"),
        ("vit_tiny_patch16_224", dict(patch_drop_rate=0.5), "it drops patches"),
        ("deit_tiny_patch16_224_ctx_product_50_shared_k", {}, "the model has iRPE already"),
        ("vit_tiny_patch16_224", dict(attn_drop_rate=0.1, attn_impl="sdpa"), "cannot apply attention dropout"),
        ("vit_tiny_patch16_224", dict(mode="bias", rpe_on="v"), "bias mode has no encoding on values"),
        ("vit_tiny_patch16_224", dict(rpe_on=""), "encode nothing"),
    ],
)
def test_refuses_what_it_cannot_do(name: str, kwargs: dict, match: str) -> None:
    """Models and settings add_irpe cannot serve raise a ValueError saying why, and leave the model unchanged."""
    build = {k: v for k, v in kwargs.items() if k.endswith("_rate")}
    with torch.device("meta"):
        model = timm.create_model(name, **build)
    before = (type(model), [type(block) for block in model.blocks] if hasattr(model, "blocks") else None)
    with pytest.raises(ValueError, match=match):
        add_irpe(model, **{k: v for k, v in kwargs.items() if k not in build})
    assert (type(model), [type(block) for block in model.blocks] if hasattr(model, "blocks") else None) == before


def test_spec_text() -> None:
    """``--irpe`` text: canonical form, round trip, and the errors a user sees."""
    spec = IRPESpec.parse(" Product, contextual ,kq,ratio=20,shared_head=false")
    assert spec == IRPESpec("product", "ctx", "qk", 20.0, False)
    assert str(spec) == "product,ctx,qk,ratio=20.0,shared_head=false" and IRPESpec.parse(str(spec)) == spec
    assert str(IRPESpec.parse("cross,bias,k")) == "cross,bias,k"
    for text, match in [
        ("product", "is not an iRPE spec: write METHOD,MODE,ON"),
        ("rope,ctx,k", "unknown iRPE method 'rope'"),
        ("product,ctx,kk", "with the letters q, k, v"),
        ("product,ctx,k,ratio=x", "ratio='x' is not a number"),
        ("product,ctx,k,ratio=0", "ratio must be a positive number"),
        ("product,ctx,k,heads=3", "unknown option 'heads=3'"),
    ]:
        with pytest.raises(ValueError, match=match):
            IRPESpec.parse(text)


# ----------------------------------------------------------------------------------------------------------------
# main.py --irpe

MAIN_ARGS = ["--model", "vit_tiny_patch16_224", "--input-size", "48", "--device", "cpu", "--num_workers", "0",
             "--batch-size", "4", "--print-freq", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding random weights as vit_tiny_patch16_224's pretrained ones (timm reads it offline)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    hub_id = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    repo, revision = cache / f"models--{hub_id.replace('/', '--')}", "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224").state_dict()
    safetensors.torch.save_file(state, repo / "snapshots" / revision / "model.safetensors")
    return cache


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, num_classes=3, train_per_class=4, val_per_class=2, image_size=56, seed=3)
    return root


def _run_main(hf_cache: Path, *argv: str) -> str:
    """``main.py argv`` in a subprocess (the real CLI) that reads pretrained weights from ``hf_cache`` offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "main.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def finetuned(hf_cache: Path, data: Path, tmp_path_factory) -> tuple[Path, str]:
    """One epoch of DeiT's recipe from timm's pretrained ViT-Tiny with iRPE on q, k and v."""
    out = tmp_path_factory.mktemp("run")
    argv = [*MAIN_ARGS, "--pretrained", "--irpe", "product,contextual,qkv", "--epochs", "1"]
    return out, _run_main(hf_cache, *argv, "--data-path", str(data), "--output_dir", str(out))


def test_main_finetunes_a_pretrained_timm_vit_with_irpe(finetuned: tuple[Path, str]) -> None:
    """--pretrained --irpe: timm's weights load, iRPE trains, and the checkpoint and args.yaml name the iRPE."""
    out, stdout = finetuned
    assert "Resized position embedding" in stdout  # timm's pretrained loader ran (224 -> 48 px)
    assert yaml.safe_load((out / "args.yaml").read_text())["irpe"] == "product,ctx,qkv"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["irpe"] == "product,ctx,qkv"
    tables = _rpe_keys(ckpt["model"])
    assert len(tables) == 3 * 12 and all(ckpt["model"][k].abs().sum() > 0 for k in tables)  # trained from zero


def _last_acc1(out: Path) -> float:
    return pytest.approx(json.loads((out / "log.txt").read_text().splitlines()[-1])["test_acc1"], abs=1e-3)


def test_main_eval_resume_rebuilds_the_model(finetuned: tuple[Path, str], data: Path, capsys) -> None:
    """--eval --resume with the run's --irpe reproduces its evaluation; without the flag the checkpoint's --irpe is
    named in one error line."""
    out, _ = finetuned
    common = ["--data-path", str(data), "--eval", "--resume", str(out / "checkpoint.pth")]
    stats = main.main(main.parse_args([*MAIN_ARGS, *common, "--irpe", "product,ctx,qkv"]))
    assert stats["acc1"] == _last_acc1(out)
    capsys.readouterr()
    assert main.cli([*MAIN_ARGS, *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: checkpoint {out / 'checkpoint.pth'} was trained with --irpe product,ctx,qkv, this run has no --irpe: "
        "pass --irpe product,ctx,qkv"
    )


@pytest.mark.slow
def test_main_eval_resume_from_args_yaml(finetuned: tuple[Path, str], hf_cache: Path, data: Path) -> None:
    """The run's args.yaml as --config rebuilds the model (with its --irpe) for --eval --resume."""
    out, _ = finetuned
    common = ["--data-path", str(data), "--eval", "--resume", str(out / "checkpoint.pth")]
    stdout = _run_main(hf_cache, "--config", str(out / "args.yaml"), *common)  # args.yaml has pretrained: true
    assert float(re.search(r"^\* Acc@1 (\d+\.\d+)", stdout, re.MULTILINE).group(1)) == _last_acc1(out)


def test_main_finetune_from_a_timm_checkpoint(data: Path, tmp_path: Path, caplog) -> None:
    """--finetune a plain timm state dict with --irpe: all its weights load (head adapted), only the tables are new."""
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=48, num_classes=3).state_dict(), tmp_path / "vit.pth")
    argv = [*MAIN_ARGS, "--data-path", str(data), "--irpe", "euc,bias,qk,ratio=2", "--epochs", "1", "--no-model-ema"]
    with caplog.at_level("INFO", logger="main"):
        stats = main.main(main.parse_args([*argv, "--finetune", str(tmp_path / "vit.pth")]))
    assert 0 <= stats["acc1"] <= 100
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Finetuning from")]
    skipped = re.search(r"missing_keys=(\[.*\]), unexpected_keys=\[\]\)$", line)
    assert skipped, line
    assert set(ast.literal_eval(skipped.group(1))) == {
        f"blocks.{i}.attn.rpe_{w}.lookup_table_bias" for i in range(12) for w in "qk"
    }


# (row id, extra argv, config YAML or None, expected message in the error line)
ERRORS = [
    ("bias-on-values", ["--irpe", "product,bias,qkv"], None, "argument --irpe: bias mode has no encoding on values"),
    ("too-short", ["--irpe", "product"], None, "argument --irpe: 'product' is not an iRPE spec: write METHOD,MODE"),
    ("yaml-method", [], "irpe: rope,ctx,k\n", "irpe: unknown iRPE method 'rope': use euc, quant, cross"),
    ("swin", ["--irpe", "product,ctx,k", "--model", "swin_tiny_patch4_window7_224"], None, "windowed or hierarchical"),
    ("zoo", ["--irpe", "product,ctx,k", "--model", "deit_small_patch16_224_ctx_euc_20_shared_k"], None,
     "the model has iRPE already"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "config", "expected"), [pytest.param(*row[1:], id=row[0]) for row in ERRORS])
def test_main_irpe_errors_are_one_line(argv: list[str], config: str | None, expected: str, tmp_path, capsys) -> None:
    """A bad --irpe (command line or YAML) or a model it cannot go into: one ``error:`` line, exit code 2."""
    if config is not None:
        (tmp_path / "cfg.yaml").write_text(config)
        argv = [*argv, "--config", str(tmp_path / "cfg.yaml")]
    full = [*MAIN_ARGS, "--data-path", str(tmp_path), *argv]
    try:
        code = main.cli(full)
    except SystemExit as e:  # argparse's own error exit
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse prints its usage first
    assert "Traceback" not in err and "error: " in last and expected in last, err
