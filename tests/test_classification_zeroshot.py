"""Zero-shot classifier on the tiny InternVL-C/G golden checkpoint: official weights, predictions, cache, video,
bad input, and the CLIP_benchmark loader (upstream code builds the same classifier)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_fm.classification import ZeroShotClassifier, build_zeroshot_weights
from internvl_fm.classification.errors import (FeatureDimError, LabelError, TemplateError,
                                               UnknownLanguageError)
from internvl_fm.classification.zeroshot import sample_frame_indices
from internvl_fm.evaluation import embed_token_ids, tokenize_prompts

LABELS = ["cat", "dog", "red panda", "a boat on the river at night"]
TWO_TEMPLATES = ["a photo of a {c}.", "a blurry drawing of the {c} in the dark."]


@pytest.fixture(scope="module")
def model(tiny_clip_path):
    from internvl_fm.models.modeling_internvl import InternVLModel

    return InternVLModel.from_pretrained(tiny_clip_path).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 36, 3), dtype=np.uint8)) for i in range(3)]


@torch.no_grad()
def _reference_weights(model, classnames, templates):
    """The official loop, one text at a time: encode, normalise, average, re-normalise; columns per class."""
    cols = []
    for name in classnames:
        embs = []
        for tpl in templates:
            ids = model.tokenizer([tpl.format(c=name)], padding="max_length")["input_ids"]
            assert ids.shape[1] == 80
            e = model.encode_text(ids)[0].double()
            embs.append(e / e.norm())
        mean = torch.stack(embs).mean(0)
        cols.append(mean / mean.norm())
    return torch.stack(cols, dim=1).float()


@pytest.mark.parametrize("padding", ["dynamic", "max_length"])
def test_weights_equal_hand_computed_reference(model, padding):
    clf = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, padding=padding, batch_size=3,
                                             progress=False)
    ref = _reference_weights(model, LABELS, TWO_TEMPLATES)
    assert clf.weights.shape == (model.embed_dim, len(LABELS))
    torch.testing.assert_close(clf.weights, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(clf.weights.norm(dim=0), torch.ones(len(LABELS)))
    # the average is over templates: one template alone gives different weights
    one = build_zeroshot_weights(model, LABELS, TWO_TEMPLATES[:1], progress=False)
    assert (one - clf.weights).abs().max() > 1e-3


def test_dynamic_padding_is_exact_and_restores_input_order(model):
    texts = ["x", "a much longer prompt about a red panda sitting on a tree", "cat", "two people eating food"]
    ids = tokenize_prompts(model.tokenizer, texts)
    lengths = (ids > 0).sum(1)
    assert len(set(lengths.tolist())) == len(texts)
    dyn = embed_token_ids(model, ids, batch_size=2, padding="dynamic", progress=False)
    full = embed_token_ids(model, ids, batch_size=2, padding="max_length", progress=False)
    torch.testing.assert_close(dyn, full, atol=1e-5, rtol=1e-4)
    single = torch.cat([embed_token_ids(model, ids[i:i + 1], padding="max_length", progress=False)
                        for i in range(len(texts))])
    torch.testing.assert_close(dyn, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["InternVL-C", "InternVL-G"])
def test_predict_probabilities_sum_to_one(model, images, mode):
    clf = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, mode=mode, progress=False)
    probs = clf.predict_proba(images)
    assert probs.shape == (len(images), len(LABELS))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(images)))
    preds = clf.predict(images, top_k=len(LABELS))
    for row, pred in zip(probs, preds):
        assert sorted(pred.labels) == sorted(LABELS)
        assert pred.probs == sorted(pred.probs, reverse=True)
        assert sum(pred.probs) == pytest.approx(1.0, abs=1e-5)
        assert pred.probs[0] == pytest.approx(float(row.max()))
        assert pred.labels[0] == LABELS[int(row.argmax())]
    top2 = clf.predict(images[0], top_k=2)[0]
    assert len(top2.labels) == 2 and next(iter(top2)) == (top2.labels[0], top2.probs[0])


def test_logits_are_100_times_cosine_and_modes_differ(model, images):
    c = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, progress=False)
    g = ZeroShotClassifier(model, c.weights, c.classnames, mode="InternVL-G")
    pixels = c._pixels(images)
    with torch.no_grad():
        img = model.encode_image(pixels, mode="InternVL-C").float()
    img = img / img.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(c(images), 100.0 * img @ c.weights, atol=1e-4, rtol=1e-4)
    assert (c(images) - g(images)).abs().max() > 1e-3
    assert pixels.shape[-1] == model.image_size  # classification transform: resize short side + center crop


def test_cache_and_save_load(model, tmp_path, monkeypatch):
    clf = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("zeroshot-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    import internvl_fm.classification.zeroshot as zs

    def boom(*args, **kwargs):
        raise AssertionError("weights were recomputed instead of read from the cache")

    monkeypatch.setattr(zs, "build_zeroshot_weights", boom)
    again = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.weights, clf.weights)
    assert again.classnames == LABELS and again.templates == TWO_TEMPLATES
    with pytest.raises(AssertionError, match="recomputed"):  # other labels -> other cache key
        ZeroShotClassifier.from_classnames(model, LABELS[:2], TWO_TEMPLATES, cache_dir=tmp_path, progress=False)

    path = clf.save(tmp_path / "clf.safetensors")
    loaded = ZeroShotClassifier.load(path, model, mode="InternVL-G")
    assert loaded.mode == "InternVL-G" and loaded.classnames == LABELS
    torch.testing.assert_close(loaded.weights, clf.weights)


def test_default_is_imagenet_in_the_requested_language(model, monkeypatch):
    import internvl_fm.classification.zeroshot as zs

    seen = {}

    def fake(model_, classnames, templates, **kwargs):
        seen.update(classnames=classnames, templates=templates)
        return torch.nn.functional.normalize(torch.randn(model_.embed_dim, len(classnames)), dim=0)

    monkeypatch.setattr(zs, "build_zeroshot_weights", fake)
    clf = ZeroShotClassifier.from_classnames(model, language="zh")
    assert clf.num_classes == 1000 and seen["classnames"][1] == "金鱼" and seen["templates"][0] == "{c}的照片。"
    assert clf.language == "zh"


def test_video_averages_frame_embeddings(model, images):
    clf = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, progress=False)
    torch.manual_seed(0)
    frames = torch.randn(10, 3, model.image_size, model.image_size)
    idx = sample_frame_indices(10, 4)
    assert idx == [1, 3, 6, 8]
    per_frame = clf.embed_images(frames[idx])
    expected = per_frame.mean(0) / per_frame.mean(0).norm()
    got = clf.embed_video(frames, num_frames=4)
    torch.testing.assert_close(got, expected)
    assert (got - per_frame[0]).abs().max() > 1e-4  # not just one frame
    one = clf.embed_video(frames, num_frames=1)  # N = 1: the central frame
    torch.testing.assert_close(one, clf.embed_images(frames[5:6])[0])
    pred = clf.predict_video(frames, num_frames=4, top_k=len(LABELS))
    assert sum(pred.probs) == pytest.approx(1.0, abs=1e-5)
    # a list of PIL frames works the same way
    torch.testing.assert_close(clf.embed_video(images, num_frames=3),
                               torch.nn.functional.normalize(clf.embed_images(images).mean(0), dim=-1))


def test_video_file_with_pyav(model, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    clf = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, progress=False)
    pred = clf.predict_video(path, num_frames=8, top_k=2)
    assert len(pred.labels) == 2 and 0.0 < pred.probs[0] <= 1.0


def test_bad_input_errors(model):
    with pytest.raises(LabelError, match="empty"):
        ZeroShotClassifier.from_classnames(model, [], TWO_TEMPLATES)
    with pytest.raises(LabelError, match="duplicate labels: 'cat'"):
        ZeroShotClassifier.from_classnames(model, ["cat", "dog", "cat"], TWO_TEMPLATES)
    with pytest.raises(UnknownLanguageError, match="'klingon'"):
        ZeroShotClassifier.from_classnames(model, LABELS, language="klingon")
    with pytest.raises(TemplateError):
        ZeroShotClassifier.from_classnames(model, LABELS, ["no placeholder"])
    clf = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, progress=False)
    with pytest.raises(FeatureDimError, match=r"\[N, 32\]"):
        clf.logits(torch.randn(2, 31))
    with pytest.raises(FeatureDimError, match="4 classes"):
        ZeroShotClassifier(model, torch.randn(32, 3), LABELS)
    with pytest.raises(FeatureDimError, match="embedding width 16"):
        ZeroShotClassifier(model, torch.randn(16, 4), LABELS)
    with pytest.raises(ValueError, match="mode"):
        ZeroShotClassifier(model, clf.weights, LABELS, mode="InternVL-X")


def test_clip_benchmark_evaluates_internvl_fm(model, tiny_clip_path, images):
    """Register our loader in CLIP_benchmark's model table and let its own code build the classifier."""
    cb_models = pytest.importorskip("clip_benchmark.models")
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from internvl_fm.classification.clip_benchmark import register_clip_benchmark

    register_clip_benchmark()
    register_clip_benchmark()  # idempotent
    assert cb_models.MODEL_TYPES.count("internvl_fm") == 1
    cb_model, transform, tokenizer = cb_models.load_clip("internvl_fm", "InternVL-C", str(tiny_clip_path),
                                                         cache_dir=None, device="cpu")
    upstream = zsc.zero_shot_classifier(cb_model, tokenizer, LABELS, TWO_TEMPLATES, "cpu", amp=False)
    ours = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, progress=False)
    torch.testing.assert_close(upstream, ours.weights, atol=1e-5, rtol=1e-4)

    pixels = torch.stack([transform(im) for im in images])
    loader = [(pixels, torch.tensor([0, 1, 2]))]
    logits, target = zsc.run_classification(cb_model, upstream, loader, "cpu", amp=False)
    torch.testing.assert_close(logits, ours(images), atol=1e-4, rtol=1e-4)
    assert target.tolist() == [0, 1, 2]


def test_weights_and_prompt_encoding_come_from_the_core(model):
    from internvl_fm import classification
    import internvl_fm.classification.zeroshot as zs
    from internvl_fm.evaluation import zeroshot_classifier_weights

    assert classification.build_zeroshot_weights is zeroshot_classifier_weights  # one implementation, two names
    # `encode_prompts` is the diffusion text encoder of InternVLTextModel; classification no longer has its own
    assert not hasattr(zs, "encode_prompts") and not hasattr(classification, "encode_prompts")
    clf = ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, progress=False)
    torch.testing.assert_close(clf.weights, zeroshot_classifier_weights(model, LABELS, TWO_TEMPLATES), atol=0, rtol=0)


def test_mode_is_resolved_once_before_any_work(model, monkeypatch):
    import internvl_fm.classification.zeroshot as zs
    from internvl_fm.classification.clip_benchmark import ClipBenchmarkModel
    from internvl_fm.classification.errors import ClassificationError

    def boom(*args, **kwargs):
        raise AssertionError("weights were built before the mode was checked")

    monkeypatch.setattr(zs, "build_zeroshot_weights", boom)
    with pytest.raises(ClassificationError, match=r"unknown mode 'InternVL-X'; use one of \('InternVL-C', "):
        ZeroShotClassifier.from_classnames(model, LABELS, TWO_TEMPLATES, mode="InternVL-X")
    for name, mode in (("internvl-g", "InternVL-G"), ("InternVL_C", "InternVL-C"), (" g ", "InternVL-G")):
        assert zs.resolve_mode(name) == mode
        assert ClipBenchmarkModel(model, name).mode == mode  # the CLIP_benchmark loader uses the same check
    with pytest.raises(ClassificationError, match="unknown mode 'clip'"):
        ClipBenchmarkModel(model, "clip")
