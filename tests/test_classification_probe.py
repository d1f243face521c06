"""Linear probe: official feature / head layout, caching, and the scikit-learn digits check of the trainer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvl_fm.classification import (FeatureSet, LinearProbeConfig, LinearProbeHead, ProbeTrainingConfig,
                                        evaluate_probe, extract_features, fit_logistic_regression,
                                        train_linear_probe)
from internvl_fm.classification.errors import ClassificationError, FeatureDimError
from internvl_fm.classification.probe import cls_patch_concat, split_holdout
from internvl_fm.errors import WeightLoadingError
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@pytest.fixture
def one_thread():
    """Tiny problems run fastest single-threaded; 2 threads on a busy shared CPU spin and crawl."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit(tiny_vit_path):
    """A fixed random InternViT (golden tiny checkpoint: 56 px, width 48)."""
    return InternVisionModel.from_pretrained(tiny_vit_path).eval()


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits (1797 8x8 grey images) upscaled to 56 px RGB and ImageNet-normalised."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=56, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - MEAN) / STD, torch.tensor(d.target)


def test_cls_patch_concat_feature(vit):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 56, 56)
    feats = extract_features(vit, (pixels, torch.zeros(3)), progress=False)
    with torch.no_grad():
        x = vit(pixels).last_hidden_state
    assert feats.features.shape == (3, 2 * vit.config.hidden_size)
    torch.testing.assert_close(feats.features, torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=-1))
    with pytest.raises(FeatureDimError):
        cls_patch_concat(torch.randn(2, 1, 8))


def test_probe_matches_sklearn_logistic_regression_on_digits(vit, digits, tmp_path, one_thread):
    linear_model = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    pixels, labels = digits
    cache = tmp_path / "digits.safetensors"
    feats = extract_features(vit, (pixels, labels), batch_size=512, cache_path=cache, cache_key="digits",
                             progress=False)
    assert cache.is_file() and feats.features.shape == (1797, 96)

    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1000], perm[1000:]
    x_tr, y_tr, x_te, y_te = feats.features[tr], labels[tr], feats.features[te], labels[te]

    scaler = preprocessing.StandardScaler().fit(x_tr.numpy())
    sk = linear_model.LogisticRegression(max_iter=1000).fit(scaler.transform(x_tr.numpy()), y_tr.numpy())
    sk_acc = float((sk.predict(scaler.transform(x_te.numpy())) == y_te.numpy()).mean())
    assert 0.6 < sk_acc < 0.95  # random-ViT features: informative, not perfect

    result = train_linear_probe(x_tr, y_tr, config=ProbeTrainingConfig(weight_decays=(0.0, 1e-3)), progress=False)
    probe_acc = evaluate_probe(result.head, x_te, y_te).metrics["acc1"]
    assert set(result.sweep) == {0.0, 1e-3} and result.best_regularization in result.sweep
    assert abs(probe_acc - sk_acc) <= 0.02, (probe_acc, sk_acc)

    # the cached features are reused (no forward pass) when model and key match
    class Exploding(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("features were recomputed")

    again = extract_features(vit, (pixels, labels), cache_path=cache, cache_key="digits", progress=False)
    torch.testing.assert_close(again.features, feats.features)
    assert again.metadata["cache_key"] == "digits"
    other_key = extract_features(vit, (pixels[:10], labels[:10]), cache_path=cache, cache_key="other",
                                 progress=False)
    assert len(other_key) == 10  # metadata mismatch -> recomputed and replaced


def test_logistic_regression_head_is_equivalent_to_sklearn(digits, vit, one_thread):
    pixels, labels = digits
    feats = extract_features(vit, (pixels[:600], labels[:600]), batch_size=600, progress=False)
    result = fit_logistic_regression(feats.features, feats.labels, Cs=(0.1, 1.0), max_iter=300, blas_threads=1)
    assert result.method == "logistic_regression" and set(result.sweep) == {0.1, 1.0}
    linear_model = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x = feats.features.double().numpy()
    scaler = preprocessing.StandardScaler().fit(x)
    sk = linear_model.LogisticRegression(C=result.best_regularization, max_iter=300).fit(scaler.transform(x),
                                                                                           feats.labels.numpy())
    with torch.no_grad():
        ours = result.head(feats.features).double()
    expected = torch.from_numpy(sk.decision_function(scaler.transform(x)))
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-3)


def test_head_layout_save_and_load(tmp_path):
    torch.manual_seed(0)
    head = LinearProbeHead(LinearProbeConfig(feature_dim=12, num_classes=5, classnames=list("abcde")))
    assert sorted(head.state_dict()) == ["head.bias", "head.weight", "norm.bias", "norm.num_batches_tracked",
                                         "norm.running_mean", "norm.running_var", "norm.weight"]
    assert head.norm.eps == 1e-6 and float(head.head.bias.detach().abs().sum()) == 0.0
    assert 0.005 < float(head.head.weight.detach().std()) < 0.02  # N(0, 0.01) init
    with torch.no_grad():
        head.norm.running_mean.normal_()
        head.head.weight.normal_()
    head.eval()
    x = torch.randn(4, 12)

    folder = head.save_pretrained(tmp_path / "head")
    loaded = LinearProbeHead.from_pretrained(folder)
    assert loaded.config.classnames == list("abcde")
    torch.testing.assert_close(loaded(x), head(x))

    # an official checkpoint: backbone + head keys under 'model', read with weights_only
    official = {"model": {"blocks.0.attn.qkv.weight": torch.randn(36, 12), "cls_token": torch.randn(1, 1, 12),
                          **{k: v.clone() for k, v in head.state_dict().items()}}, "epoch": 9}
    torch.save(official, tmp_path / "intern_vit_6b_224px_head.pth")
    from_pth = LinearProbeHead.from_pretrained(tmp_path / "intern_vit_6b_224px_head.pth")
    assert from_pth.config.feature_dim == 12 and from_pth.config.num_classes == 5
    torch.testing.assert_close(from_pth.eval()(x), head(x))

    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(3)}}, tmp_path / "backbone.pth")
    with pytest.raises(WeightLoadingError, match="head.weight"):
        LinearProbeHead.from_pretrained(tmp_path / "backbone.pth")
    bad = {k: v for k, v in head.state_dict().items()}
    bad["norm.weight"] = torch.ones(7)
    with pytest.raises(WeightLoadingError, match="norm.weight"):
        head.load_head_state_dict(bad)


def test_mismatched_feature_dims_are_clear_errors():
    head = LinearProbeHead(LinearProbeConfig(feature_dim=8, num_classes=3)).eval()
    with pytest.raises(FeatureDimError, match=r"\[N, 8\]"):
        head(torch.randn(2, 9))
    with pytest.raises(FeatureDimError, match=r"\[N, 8\]"):
        evaluate_probe(head, torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(FeatureDimError, match="labels"):
        FeatureSet(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(FeatureDimError, match="width"):
        train_linear_probe(torch.randn(10, 8), torch.arange(10) % 2, val_features=torch.randn(4, 7),
                           val_labels=torch.zeros(4, dtype=torch.long), progress=False)
    with pytest.raises(ClassificationError, match="feature type"):
        LinearProbeHead(LinearProbeConfig(feature_dim=8, num_classes=3, feature_type="pooler"))


def test_holdout_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = split_holdout(labels, 0.2, seed=1)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == len(labels)
    assert (labels[va] == 0).sum() == 2 and (labels[va] == 1).sum() == 1 and (labels[va] == 2).sum() == 0
    with pytest.raises(ClassificationError):
        split_holdout(labels, 1.5)


def test_clip_embedding_features(tiny_clip_path):
    from internvl_fm.models.modeling_internvl import InternVLModel

    model = InternVLModel.from_pretrained(tiny_clip_path)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28)
    feats = extract_features(model, (pixels, torch.tensor([0, 1])), feature_type="clip_embedding", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(feats.features, model.encode_image(pixels, mode="InternVL-C"))
    vit_only = InternVisionModel(InternVisionConfig(image_size=28, hidden_size=16, num_attention_heads=2,
                                                    intermediate_size=32, num_hidden_layers=1))
    with pytest.raises(ClassificationError, match="InternVLModel"):
        extract_features(vit_only, (pixels, torch.tensor([0, 1])), feature_type="clip_embedding", progress=False)
