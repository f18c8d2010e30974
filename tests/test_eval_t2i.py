"""``stepdistill eval`` of text-to-image students (issue 23): the metric code against hand computations, the whole
path on tiny SD1.5 and FLUX students with tiny random feature networks built here, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from stepdistill.cli import main
from stepdistill.config import build_recipe
from stepdistill.eval_t2i import ClipScorer, clip_scores, evaluate_export, fid_kid
from stepdistill.evaluate import frechet_distance
from stepdistill.tiny import tiny_clip
from stepdistill.train import Trainer

from ._recipes import family_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFeatures(nn.Module):
    """A seeded random feature network (images in [0, 1] of any size -> 32 features), standing in for Inception."""

    num_features = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, images):
        return self.net(images * 2 - 1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    model, processor = tiny_clip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SD1.5 and a tiny FLUX student, each distilled for three steps and exported (2 steps)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPDISTILL_CACHE", str(root / "cache"))
        for family in ("sd15", "flux"):
            trainer = Trainer(build_recipe(family_recipe(family)), root / family, show_progress=False).setup()
            trainer.train()
            trainer.export()
            out[family] = root / family
    return out


def _reference(folder, sizes):
    folder.mkdir()
    g = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# The metric code against hand computations.


def test_fid_is_the_frechet_distance_and_kid_the_unbiased_polynomial_mmd():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64)
    b = 1.3 * torch.randn(40, 6, generator=g, dtype=torch.float64) + 0.2
    out = fid_kid(a, b, subsets=1, subset_size=40)  # one subset of all rows: KID is then order-free
    assert out["fid"] == pytest.approx(frechet_distance(a.numpy(), b.numpy()), rel=1e-6)

    def k(x, y):  # KID's kernel (Binkowski et al. 2018): (x.y / d + 1)^3
        return (x @ y.T / x.shape[1] + 1) ** 3

    m = a.shape[0]
    off = 1 - torch.eye(m, dtype=torch.float64)
    mmd = ((k(a, a) * off).sum() + (k(b, b) * off).sum()) / (m * (m - 1)) - 2 * k(a, b).mean()
    assert out["kid"] == pytest.approx(float(mmd), rel=1e-9)
    assert out["kid_subset_size"] == 40
    assert fid_kid(a, a, subsets=1, subset_size=40)["fid"] == pytest.approx(0, abs=1e-6)


def test_clip_score_is_100_times_the_cosine_clipped_at_zero():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    assert clip_scores(img, txt).tolist() == pytest.approx([100.0, 100 / 2 ** 0.5, 0.0])


def test_clip_scorer_agrees_with_the_models_own_similarity(clip_dir):
    """Our per-image score is ``logits_per_image / logit_scale`` of transformers' own CLIP forward, clipped at 0."""
    scorer = ClipScorer(str(clip_dir))
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a red bus by the curb", "x"]
    ours = scorer(images, prompts)
    pixels = [(im * 255).round().to(torch.uint8) for im in images]
    inputs = scorer.processor(text=prompts, images=pixels, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(**inputs)
    theirs = (out.logits_per_image.diagonal() / scorer.model.logit_scale.exp() * 100).clamp(min=0).double()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The whole path.


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_students_are_scored_beside_the_teachers_calls_on_the_same_noise(runs, clip_dir, tmp_path, family):
    run = runs[family]
    ref = _reference(tmp_path / "ref", [(24, 24)] * 3)
    metrics, metrics_path, picture = evaluate_export(
        run / "pipeline", tmp_path / "out", prompts_file=_prompts(tmp_path),
        reference=str(ref), num=4, batch_size=2, seed=0, device="cpu", clip_model=str(clip_dir),
        features=TinyFeatures(), log=lambda line: None)
    assert json.loads(metrics_path.read_text()) == json.loads(json.dumps(metrics))
    student, same, full = metrics["student"], metrics["teacher_same_steps"], metrics["teacher_default"]
    # the calls: the student's exported call, the teacher's stock defaults (SD1.5 50 steps with CFG, FLUX 28
    # without), and the teacher at the student's steps; NFE counted on the backbone (a CFG pair counts 2)
    assert student["call"]["num_inference_steps"] == same["call"]["num_inference_steps"] == 2
    assert full["call"]["num_inference_steps"] == (50 if family == "sd15" else 28)
    expected = (2, 4, 100) if family == "sd15" else (2, 2, 28)
    assert (student["nfe_per_image"], same["nfe_per_image"], full["nfe_per_image"]) == expected
    for row in (student, same, full):
        assert row["seconds_per_image"] > 0 and 0 <= row["clip_score"] <= 100
        assert np.isfinite([row["fid_vs_reference"], row["kid_vs_reference"]]).all()
    assert np.isfinite([student["fid_vs_teacher"], same["kid_vs_teacher"]]).all()
    assert metrics["speedup_vs_teacher_default"] > 1
    assert metrics["not_computed"] == [] and metrics["feature_network"] == "TinyFeatures"
    with Image.open(picture) as im:  # 4 prompt rows x 3 columns
        assert im.size[1] > 4 * 192 and im.size[0] > 3 * 192


def test_every_call_starts_from_the_same_noise(runs):
    """Image i of each call has the same prompt and initial noise: the teacher at its default call and at the
    student's steps agree far better row by row than across rows (the pairing compare.png shows)."""
    from stepdistill.eval_t2i import evaluate_text_to_image, load_pipelines

    student, teacher, meta, backbone = load_pipelines(runs["sd15"] / "pipeline", device="cpu")
    _, sets = evaluate_text_to_image(student, teacher, meta["call"], backbone=backbone, num=4, batch_size=2,
                                     prompts=["a red cat", "a lighthouse at dusk"], show=4)
    full, same = (torch.cat(s.shown) for s in sets[:2])
    dist = (full[:, None] - same[None]).abs().mean(dim=(2, 3, 4))  # [4, 4]
    off = dist[~torch.eye(4, dtype=torch.bool)]
    assert dist.diagonal().max() < 0.5 * off.min(), dist


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_cli_eval_of_a_run_writes_metrics_picture_and_card(runs, clip_dir, tmp_path, capsys, family):
    """Through ``stepdistill eval`` with tiny nets saved as a user would point at them: a CLIP folder and a DINOv2
    folder (``--features dinov2:DIR``, FD_DINOv2's features)."""
    from stepdistill.nets.dino import _tiny_model

    run, dino = tmp_path / "run", tmp_path / "dino"
    shutil.copytree(runs[family], run)
    _tiny_model().save_pretrained(dino)
    assert main(["eval", str(run), "--num-samples", "2", "--batch-size", "2", "--clip-model", str(clip_dir),
                 "--features", f"dinov2:{dino}"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert json.loads(out) == metrics and metrics["clip_model"] == str(clip_dir) and metrics["not_computed"] == []
    assert metrics["feature_network"].startswith("dinov2") and np.isfinite(metrics["student"]["fid_vs_teacher"])
    assert np.isfinite([metrics[k]["kid_vs_teacher"] for k in ("student", "teacher_same_steps")]).all()
    assert (run / "eval" / "compare.png").is_file() and (run / "pipeline" / "compare.png").is_file()
    card = (run / "pipeline" / "README.md").read_text()
    assert "![teacher and student side by side](compare.png)" in card and '"clip_score"' in card
    assert card.startswith("---\n") and "library_name: diffusers" in card  # the front matter stays
    assert f"metrics: {run / 'eval' / 'metrics.json'}" in err
    if family == "flux":
        return
    # an exported folder is left as it is; its results go beside it
    before = {p.name: p.stat().st_mtime_ns for p in (run / "pipeline").iterdir()}
    assert main(["eval", str(run / "pipeline"), "--num-samples", "2", "--clip-model", str(clip_dir)]) == 0
    err = capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "pipeline").iterdir()} == before
    metrics = json.loads((run / "pipeline-eval" / "metrics.json").read_text())
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:  # without torch-fidelity: one line says what is missing and the rest still ran
        assert "FID/KID not computed: their Inception network needs torch-fidelity" in err
        assert "still computed: CLIP score, wall time and NFE per image, compare.png" in err
        assert metrics["not_computed"] and "fid_vs_teacher" not in metrics["student"]
        assert "clip_score" in metrics["student"]


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\na lighthouse at dusk\na bowl of ramen\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.


@pytest.mark.parametrize("case, match", [
    ("empty_prompts", "--prompts: .* holds no prompts"),
    ("no_images", "--reference: .* holds 0 images"),
    ("mixed_sizes", "--reference: images of mixed sizes"),
    ("one_image", "--num-samples: FID and KID need at least 2 images"),
    ("no_export", "has no exported pipeline"),
    ("features", "--features: 'vgg'; use inception or dinov2"),
])
def test_bad_eval_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, case, match):
    run = tmp_path / "run"
    shutil.copytree(runs["sd15"], run, ignore=shutil.ignore_patterns("pipeline") if case == "no_export" else None)
    args = ["eval", str(run), "--clip-model", "none"]
    if case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n  \n")
        args += ["--prompts", str(tmp_path / "empty.txt")]
    elif case == "no_images":
        (tmp_path / "ref").mkdir()
        (tmp_path / "ref" / "notes.txt").write_text("x")
        args += ["--reference", str(tmp_path / "ref")]
    elif case == "mixed_sizes":
        args += ["--reference", str(_reference(tmp_path / "ref", [(24, 24), (32, 24)]))]
    elif case == "one_image":
        args += ["--num-samples", "1"]
    elif case == "features":
        args += ["--features", "vgg"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("stepdistill: error:")
    assert __import__("re").search(match, err), err
    assert not (run / "eval").exists()
