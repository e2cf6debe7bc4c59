"""DWML: label text encoders and their cache, the prototype head, the dwml loss (hand-computed cases),
and the text path being live. No test downloads anything: the hf: encoder runs on a tiny BERT built here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrlab.errors import CxrlabError
from cxrlab.labels import CHEXPERT14, MIMIC14, NIH14
from cxrlab.labels_text import LabelText, label_texts
from cxrlab.losses.base import LossContext
from cxrlab.losses.dwml import DWML, category_weights
from cxrlab.models.heads.prototype import PrototypeHead
from cxrlab.models.text import cosine_matrix, encode_labels, get_encoder
from cxrlab.output import Output
from fakes import no_plots as _no_plots

C, D = 3, 10


def have_wordllama() -> bool:
    try:
        import wordllama  # noqa: F401
    except ImportError:
        return False
    return True


TEXT_ENCODERS = ["hashed"] + (["wordllama"] if have_wordllama() else [])


def ctx(pos, neg) -> LossContext:
    c = len(pos)
    out = LossContext.from_targets(tuple(f"l{i}" for i in range(c)), np.zeros((2, c)), np.ones((2, c)))
    out.pos_count, out.neg_count = np.asarray(pos, float), np.asarray(neg, float)
    return out


def head_with_text(seed: int = 0, dim: int = 8, text_dim: int = 6) -> PrototypeHead:
    torch.manual_seed(seed)
    head = PrototypeHead(D, C, dim=dim, hidden=16)
    head.set_label_text(np.random.default_rng(seed).standard_normal((C, text_dim)))
    return head


# ------------------------------------------------------------------------------------------ head

def test_head_unit_vectors_similarity_range_and_logits():
    head = head_with_text()
    out = head(torch.randn(5, D, 3, 3))
    z, q, m = out.extras["embedding"], out.extras["prototypes"], out.extras["similarity"]
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(C))
    assert m.shape == (5, C) and (m.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(m, z @ q.t())
    torch.testing.assert_close(out.logits, head.kappa * m + head.bias)
    assert math.isclose(float(head.kappa.detach()), 16.0, rel_tol=1e-6)
    torch.testing.assert_close(head.bias, torch.full((C,), -0.3 * 16.0))
    out.logits.sum().backward()
    assert head.text_proj.weight.grad is not None and head.text_proj.weight.grad.abs().sum() > 0
    assert head.log_kappa.grad is not None and head.bias.grad is not None
    assert not head.label_text.requires_grad  # the text vectors are fixed, only the projection trains


def test_head_without_text_and_with_wrong_text_says_so():
    head = PrototypeHead(D, C, dim=8, hidden=16)
    with pytest.raises(CxrlabError, match="set_label_text"):
        head(torch.randn(2, D, 2, 2))
    with pytest.raises(CxrlabError, match="3 label text vectors"):
        head.set_label_text(np.ones((C + 1, 4)))
    with pytest.raises(CxrlabError, match="feature map"):
        head_with_text()(torch.randn(2, D + 1, 2, 2))


def test_bare_head_takes_its_shape_from_a_state_dict_and_rejects_another_dim():
    trained = head_with_text(seed=1, dim=8, text_dim=6)
    bare = PrototypeHead(D, C, dim=8, hidden=16)
    bare.load_state_dict(trained.state_dict())  # no text encoder needed
    x = torch.randn(4, D, 2, 2)
    assert torch.equal(bare.eval()(x).logits, trained.eval()(x).logits)
    with pytest.raises(CxrlabError, match=r"prototype projection is \(8, 6\).*\(4, 6\)"):
        PrototypeHead(D, C, dim=4, hidden=16).load_state_dict(trained.state_dict())
    with pytest.raises(CxrlabError, match="3 labels"):
        PrototypeHead(D, C, dim=8, hidden=16).load_state_dict(
            {**trained.state_dict(), "label_text": torch.zeros(C + 2, 6)})


def test_changing_one_description_changes_only_that_prototype():
    names = list(NIH14.names[:C])
    base = label_texts(names)
    edited = label_texts(names, {names[1]: "a completely different sentence about bones and wires"})
    v0, _ = encode_labels(base, "hashed")
    v1, _ = encode_labels(edited, "hashed")
    assert np.array_equal(v0[[0, 2]], v1[[0, 2]]) and not np.allclose(v0[1], v1[1])
    torch.manual_seed(0)
    head = PrototypeHead(D, C, dim=8, hidden=16)
    head.set_label_text(v0)
    q0 = head.prototypes().detach().clone()
    head.set_label_text(v1)  # same width: the projection is kept, only the text changes
    q1 = head.prototypes().detach()
    assert torch.equal(q0[[0, 2]], q1[[0, 2]])
    assert (q0[1] - q1[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ loss

def test_category_weights_by_hand():
    # rates 0.01, 0.04, 0.09 -> rate^-1/2 = 10, 5, 10/3 -> / mean (55/9)
    w = category_weights([1, 4, 9], [99, 96, 91])
    np.testing.assert_allclose(w, np.array([10, 5, 10 / 3]) / (55 / 9))
    assert math.isclose(w.mean(), 1.0)
    np.testing.assert_allclose(category_weights([1, 4, 9], [99, 96, 91], power=0.0), np.ones(3))
    # a label with no known positive counts as having one
    np.testing.assert_allclose(category_weights([0, 1], [100, 99]), [1.0, 1.0])


def _sp(x: float) -> float:
    return math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dwml_hardness_weighted_loss_by_hand():
    term = DWML(ctx([1, 4], [3, 0]))  # rates 1/4, 1 -> w ∝ 2, 1 -> w = 4/3, 2/3
    m = torch.tensor([[0.6, 0.0], [0.2, 0.4]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = Output(torch.zeros(2, 2), {"similarity": m})
    loss = term(out, {"target": y, "mask": torch.ones(2, 2)})
    w = [4 / 3, 2 / 3]
    l00, l01 = _sp(16 * (0.5 - 0.6)), _sp(16 * (0.0 - 0.1))  # positive above δ⁺, negative below δ⁻
    l10, l11 = _sp(16 * (0.2 - 0.1)), _sp(16 * (0.5 - 0.4))  # negative above δ⁻, positive below δ⁺
    p = lambda s: _sig(16 * (s - 0.3))  # noqa: E731
    v0 = 1 + (abs(1 - p(0.6)) + abs(0 - p(0.0))) / 2
    v1 = 1 + (abs(0 - p(0.2)) + abs(1 - p(0.4))) / 2
    expected = (v0 * (w[0] * l00 + w[1] * l01) / 2 + v1 * (w[0] * l10 + w[1] * l11) / 2) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_dwml_inverse_positives_and_unweighted_by_hand():
    m = torch.tensor([[0.6, 0.3, 0.0], [0.2, 0.2, 0.2]])
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = Output(torch.zeros(2, 3), {"similarity": m})
    ell = [[_sp(16 * -0.1), _sp(16 * 0.2), _sp(16 * -0.1)], [_sp(16 * 0.1)] * 3]
    inv = DWML(ctx([5, 5, 5], [5, 5, 5]), image_weight="inverse_positives")
    expected = (0.5 * sum(ell[0]) / 3 + 1.0 * sum(ell[1]) / 3) / 2  # |P_0| = 2, |P_1| = 0 -> 1
    assert math.isclose(float(inv(out, {"target": y, "mask": torch.ones(2, 3)})), expected, rel_tol=1e-5)
    plain = DWML(ctx([5, 5, 5], [5, 5, 5]), image_weight="none", category_power=0.0)
    expected = (sum(ell[0]) / 3 + sum(ell[1]) / 3) / 2
    assert math.isclose(float(plain(out, {"target": y, "mask": torch.ones(2, 3)})), expected, rel_tol=1e-5)


def test_dwml_ignores_masked_labels_and_images_without_known_labels():
    term = DWML(ctx([2, 3, 4], [8, 7, 6]))
    m = torch.tensor([[0.6, -0.2, 0.3], [0.1, 0.9, -0.5]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    loss = term(Output(torch.zeros(2, 3), {"similarity": m}), {"target": y, "mask": mask})
    loss.backward()
    assert (m.grad[mask == 0] == 0).all() and (m.grad[mask == 1] != 0).all()
    # anything at the masked entries (targets or similarities) leaves the loss unchanged
    m2 = m.detach().clone()
    m2[mask == 0] = torch.tensor([0.99, -0.9, 0.4, 0.0])
    y2 = torch.where(mask == 1, y, 1 - y)
    again = term(Output(torch.zeros(2, 3), {"similarity": m2}), {"target": y2, "mask": mask})
    assert torch.equal(loss.detach(), again)
    # the image with no known label drops out: the loss is the first image's alone
    alone = term(Output(torch.zeros(1, 3), {"similarity": m[:1].detach()}), {"target": y[:1], "mask": mask[:1]})
    torch.testing.assert_close(loss.detach(), alone)


def test_dwml_image_weights_carry_no_gradient_and_bce_option_adds_bce():
    m = torch.tensor([[0.45, 0.05]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0]])
    batch = {"target": y, "mask": torch.ones(1, 2)}
    hard = DWML(ctx([1, 1], [1, 1]), category_power=0.0)
    plain = DWML(ctx([1, 1], [1, 1]), category_power=0.0, image_weight="none")
    v = float(hard.image_weights(m, y, torch.ones(1, 2)))
    g_hard = torch.autograd.grad(hard(Output(torch.zeros(1, 2), {"similarity": m}), batch), m)[0]
    g_plain = torch.autograd.grad(plain(Output(torch.zeros(1, 2), {"similarity": m}), batch), m)[0]
    torch.testing.assert_close(g_hard, v * g_plain)  # v_i only scales: no gradient through it
    logits = torch.tensor([[1.5, -2.0]])
    with_bce = DWML(ctx([1, 1], [1, 1]), bce_weight=0.5)
    without = DWML(ctx([1, 1], [1, 1]))
    out = Output(logits, {"similarity": m.detach()})
    bce = F.binary_cross_entropy_with_logits(logits, y)
    torch.testing.assert_close(with_bce(out, batch), without(out, batch) + 0.5 * bce)


def test_dwml_bad_input():
    with pytest.raises(CxrlabError, match="did you mean 'hardness'"):
        DWML(ctx([1], [1]), image_weight="hardnes")
    with pytest.raises(CxrlabError, match="margin_neg < margin_pos"):
        DWML(ctx([1], [1]), margin_pos=0.1, margin_neg=0.5)
    with pytest.raises(CxrlabError, match="model.head=prototype"):
        DWML(ctx([1], [1]))(Output(torch.zeros(1, 1)), {"target": torch.zeros(1, 1)})


@pytest.fixture
def one_thread():
    """Steps this small run faster on one thread (no waking of a second on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_prototype_head_and_dwml_learn_a_toy_task(one_thread):
    """Three labels, each a bright patch in its own place: AUC well above chance after a few steps."""
    rng = np.random.default_rng(0)
    n = 192
    y = (rng.random((n, C)) < 0.35).astype(np.float32)
    x = rng.normal(0, 0.3, (n, D, 4, 4)).astype(np.float32)
    for c in range(C):
        x[:, c, c, :] += 1.5 * y[:, c:c + 1]
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    head = head_with_text(seed=0, dim=16)
    term = DWML(LossContext.from_targets(("a", "b", "c"), y.numpy(), np.ones_like(y.numpy())))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % n
        loss = term(head(x[idx]), {"target": y[idx], "mask": torch.ones(32, C)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    with torch.no_grad():
        scores = head.eval()(x).logits.numpy()
    from sklearn.metrics import roc_auc_score
    aucs = [roc_auc_score(y[:, c].numpy(), scores[:, c]) for c in range(C)]
    assert min(aucs) > 0.9, aucs


# ------------------------------------------------------------------------------------------ label text

def test_every_label_space_has_descriptions_and_overrides_are_checked():
    for space in (NIH14, CHEXPERT14, MIMIC14):
        texts = label_texts(space.names)
        assert [t.name for t in texts] == list(space.names)
        assert all(len(t.description.split()) >= 8 and t.synonyms for t in texts)
    with pytest.raises(CxrlabError, match="no description for label 'Foo'.*label_descriptions"):
        label_texts(["Atelectasis", "Foo"])
    custom = label_texts(["Foo"], {"Foo": "a made up finding"})
    assert custom[0].description == "a made up finding" and custom[0].text().startswith("Foo: a made up")
    with pytest.raises(CxrlabError, match="did you mean 'Cardiomegaly'"):
        label_texts(NIH14.names, {"Cardiomegally": "big heart"})
    with pytest.raises(CxrlabError, match="did you mean 'synonyms'"):
        label_texts(NIH14.names, {"Edema": {"synonym": ["water"]}})
    kept = label_texts(NIH14.names, {"Edema": {"synonyms": ["water on the lung"]}})[NIH14.names.index("Edema")]
    assert kept.synonyms == ("water on the lung",) and "interstitium" in kept.description


RELATED = {"nih14": [("Consolidation", "Pneumonia"), ("Effusion", "Pleural_Thickening"), ("Mass", "Nodule"),
                     ("Infiltration", "Pneumonia")],
           "chexpert14": [("Consolidation", "Pneumonia"), ("Pleural Effusion", "Pleural Other"),
                          ("Lung Lesion", "Lung Opacity"), ("Cardiomegaly", "Enlarged Cardiomediastinum"),
                          ("Lung Opacity", "Consolidation")]}
UNRELATED = {"nih14": [("Hernia", "Nodule"), ("Cardiomegaly", "Pneumothorax"), ("Emphysema", "Mass"),
                       ("Fibrosis", "Hernia")],
             "chexpert14": [("Fracture", "Edema"), ("Support Devices", "Pneumonia"),
                            ("Cardiomegaly", "Pneumothorax"), ("Fracture", "Lung Lesion")]}


@pytest.mark.parametrize("encoder", TEXT_ENCODERS)
@pytest.mark.parametrize("space", [NIH14, CHEXPERT14], ids=lambda s: s.name)
def test_related_labels_are_closer_than_unrelated(encoder, space):
    names = list(space.names)
    v, _ = encode_labels(label_texts(names), encoder)
    sim = cosine_matrix(v)
    s = lambda a, b: sim[names.index(a), names.index(b)]  # noqa: E731
    related = [s(a, b) for a, b in RELATED[space.name]]
    unrelated = [s(a, b) for a, b in UNRELATED[space.name]]
    assert min(related) > max(unrelated), (related, unrelated)
    # every related pair sits in the top third of all label pairs (the top quarter holds for hashed;
    # wordllama puts Lung Lesion-Lung Opacity at the 73rd percentile)
    upper = sim[np.triu_indices(len(names), 1)]
    assert min(related) > np.quantile(upper, 2 / 3)


def test_random_encoder_ignores_text_and_is_fixed():
    texts = label_texts(NIH14.names)
    a, _ = encode_labels(texts, "random")
    b, _ = encode_labels(label_texts(NIH14.names, {"Edema": "something else"}), "random")
    c, _ = encode_labels(texts, "random", {"seed": 1})
    assert np.array_equal(a, b) and not np.allclose(a, c)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)


def test_hashed_encoder_is_deterministic_unit_and_word_based():
    enc = get_encoder("hashed")
    v = enc.encode(["Pleural thickening of the pleura", "pleural thickening pleura", "rib fracture"], ["a", "b", "c"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0)
    assert v[0] @ v[1] > 0.99  # stop words ("of", "the") and case do not count
    assert v[0] @ v[1] > v[0] @ v[2] + 0.5


# ------------------------------------------------------------------------------------------ cache

ENCODERS_CACHED = ["hashed", "random", "tiny_bert"] + (["wordllama"] if have_wordllama() else [])


@pytest.mark.parametrize("which", ENCODERS_CACHED)
def test_cache_is_reused_and_invalidated_when_descriptions_change(which, tmp_path, monkeypatch):
    spec = f"hf:{tiny_bert(tmp_path / 'bert')}" if which == "tiny_bert" else which
    names = list(NIH14.names[:4])
    texts = label_texts(names)
    first, identity = encode_labels(texts, spec, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache" / "text-embeddings").iterdir())
    assert len(files) == 1 and identity["name"] == spec

    def refuse(self, *args):
        raise AssertionError("encoded again although cached")

    cls = type(get_encoder(spec))
    with monkeypatch.context() as patch:
        patch.setattr(cls, "encode", refuse)
        again, identity_again = encode_labels(texts, spec, cache_dir=tmp_path / "cache")
    assert np.array_equal(first, again) and identity_again == identity  # bit-identical from the cache
    edited = label_texts(names, {names[2]: "fluid and air in a completely new description"})
    changed, identity_changed = encode_labels(edited, spec, cache_dir=tmp_path / "cache")
    assert identity_changed["texts_sha256"] != identity["texts_sha256"]
    assert len(list((tmp_path / "cache" / "text-embeddings").iterdir())) == 2
    if which != "random":  # the control ignores the text by design
        assert not np.allclose(changed[2], first[2]) and np.allclose(changed[[0, 1, 3]], first[[0, 1, 3]], atol=1e-5)


# ------------------------------------------------------------------------------------------ hf:

def tiny_bert(folder):
    """A 2-layer, 32-wide BERT with random weights and a 40-word vocabulary, saved like a hub model."""
    transformers = pytest.importorskip("transformers")
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True)
    words = ("fluid air lung pleural pleura space heart chest opacity the a of in with and around wall "
             "collapse infection bone rib mass nodule enlarged large small dense edema pus ##s ##ing").split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return folder


def test_hf_encoder_on_a_tiny_local_bert_mean_and_cls_pooling(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tiny_bert(tmp_path / "bert")
    texts = ["fluid in the pleural space", "air around the lung with collapse", "rib bone"]
    mean = get_encoder(f"hf:{folder}").encode(texts, ["a", "b", "c"])
    cls = get_encoder(f"hf:{folder}", {"pooling": "cls"}).encode(texts, ["a", "b", "c"])
    assert mean.shape == (3, 32) and cls.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, rtol=1e-6)
    # the same numbers straight from transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        batch = tok(texts, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.double()
    w = batch["attention_mask"].unsqueeze(-1).double()
    ref = ((hidden * w).sum(1) / w.sum(1)).numpy()
    np.testing.assert_allclose(mean, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    ref_cls = hidden[:, 0].numpy()
    np.testing.assert_allclose(cls, ref_cls / np.linalg.norm(ref_cls, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(mean, cls)
    identity = get_encoder(f"hf:{folder}").identity()
    assert identity["pooling"] == "mean" and len(identity["files_sha256"]["config.json"]) == 64


def test_text_encoder_bad_input(tmp_path, monkeypatch):
    with pytest.raises(CxrlabError, match="did you mean 'hashed'"):
        get_encoder("hashd")
    with pytest.raises(CxrlabError, match="did you mean 'seed'"):
        get_encoder("random", {"sed": 1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrlabError, match="not a model folder \\(no config.json\\)"):
        get_encoder(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(CxrlabError, match="is not a folder"):
        get_encoder(f"hf:{tmp_path / 'missing'}")
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CxrlabError, match="not found on disk.*hf:/that/folder.*download"):
        get_encoder("hf:nobody/no-such-model")
    with pytest.raises(CxrlabError, match="did you mean 'cls'"):
        get_encoder(f"hf:{tiny_bert(tmp_path / 'bert')}", {"pooling": "clss"})


def test_label_text_repr_is_what_encoders_read():
    t = LabelText("Pleural_Thickening", ("pleural scarring",), "thickened pleura.")
    assert t.text() == "Pleural Thickening: thickened pleura. Also called pleural scarring."


# ------------------------------------------------------------------------------------------ pipeline

def test_train_checkpoint_predict_and_prototypes_command(tmp_path, monkeypatch):
    """Train through the CLI: the checkpoint carries the text vectors and the encoder's identity, and
    prediction and `cxrlab prototypes` run without any text encoder."""
    import json

    import pandas as pd
    from PIL import Image
    from safetensors.torch import load_file

    import cxrlab.models.text as text
    from cxrlab.cli import main

    over = ["data.source=synthetic:96", "data.image_size=32", "train.epochs=1", "train.batch_size=32",
            "eval.bootstrap=0", "data.val_fraction=0.25", "data.test_fraction=0.25", "model.backbone=test_resnet",
            "model.head_args.dim=32", "model.head_args.hidden=32", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "dwml_synthetic", "--out", str(tmp_path / "a"), *over]) == 0
    info = json.loads((tmp_path / "a" / "best" / "checkpoint.json").read_text())
    assert info["label_text"]["name"] == "hashed" and len(info["label_text"]["texts_sha256"]) == 64
    assert len(list((tmp_path / "cache" / "text-embeddings").glob("hashed-*.npy"))) == 1
    weights = load_file(str(tmp_path / "a" / "best" / "model.safetensors"))
    cached, _ = encode_labels(label_texts(NIH14.names), "hashed", cache_dir=tmp_path / "cache")
    assert torch.equal(weights["model.head.label_text"], torch.from_numpy(cached))  # the matrix itself

    def no_encoder(*args, **kwargs):
        raise AssertionError("a text encoder ran")

    monkeypatch.setattr(text, "get_encoder", no_encoder)
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "one.png")
    assert main(["predict", str(tmp_path / "a"), str(tmp_path / "one.png"), "--out", str(tmp_path / "p.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "p.csv")
    assert len(predicted) == 1 and set(NIH14.names) <= set(predicted.columns)
    assert main(["prototypes", str(tmp_path / "a"), "--out", str(tmp_path / "proto")]) == 0
    learned = pd.read_csv(tmp_path / "proto" / "prototype_cosine.csv", index_col=0)
    given = pd.read_csv(tmp_path / "proto" / "text_cosine.csv", index_col=0)
    assert list(learned.columns) == list(NIH14.names) and learned.shape == given.shape == (14, 14)
    np.testing.assert_allclose(np.diag(learned.to_numpy()), 1.0, atol=1e-3)
    np.testing.assert_allclose(given.to_numpy(), cosine_matrix(cached), atol=1e-4)
    assert (learned.abs().to_numpy() <= 1 + 1e-6).all() and (tmp_path / "proto" / "prototypes.png").is_file()
    summary = json.loads((tmp_path / "proto" / "prototypes.json").read_text())
    assert summary["text_encoder"]["name"] == "hashed"


def test_two_runs_from_the_same_cache_are_bit_identical(tmp_path, monkeypatch, one_thread):
    import cxrlab.models.text as text

    texts = label_texts(NIH14.names[:C])
    encode_labels(texts, "hashed", cache_dir=tmp_path)

    def no_encoder(*args, **kwargs):
        raise AssertionError("encoded again although cached")

    monkeypatch.setattr(text.HashedEncoder, "encode", no_encoder)
    x, y = torch.randn(32, D, 3, 3), (torch.rand(32, C) < 0.4).float()

    def run() -> dict:
        torch.manual_seed(0)
        head = PrototypeHead(D, C, dim=8, hidden=16)
        head.set_label_text(*encode_labels(texts, "hashed", cache_dir=tmp_path))
        term = DWML(LossContext.from_targets(tuple(NIH14.names[:C]), y.numpy(), np.ones((32, C))), bce_weight=0.5)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
        for _ in range(5):
            loss = term(head(x), {"target": y, "mask": torch.ones_like(y)})
            opt.zero_grad()
            loss.backward()
            opt.step()
        return head.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prototypes_command_refuses_other_heads(tmp_path, monkeypatch, capsys):
    import cxrlab.checkpoint
    from cxrlab.cli import main
    from cxrlab.models import build_model

    linear = build_model("test_resnet", "linear", 3)
    monkeypatch.setattr(cxrlab.checkpoint, "load_model",
                        lambda path, ema=None: (linear, {"labels": ["a", "b", "c"],
                                                         "recipe": {"model": {"head": "linear"}}}))
    assert main(["prototypes", str(tmp_path / "lin"), "--out", str(tmp_path / "p")]) == 2
    assert "has head 'linear'" in capsys.readouterr().err


# ---------------------------------------- issue 23: ranking term, metrics, frozen text, focal weights

def test_ranking_term_by_hand_excludes_labels_without_both_sides():
    from cxrlab.losses.base import Objective
    from cxrlab.losses.dwml import ranking_loss
    from cxrlab.registry import LOSSES

    m = torch.tensor([[0.6, 0.2, 0.1], [0.3, 0.5, 0.0], [0.1, 0.4, -0.2]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 0, 1]])  # image 2's label 1 unknown
    # label 0: positive 0 against negatives 1, 2; label 1: positive 1 against negative 0 (image 2
    # unknown); label 2: no positive in the batch -> left out
    r0 = (_sp(16 * (0.3 - 0.6 + 0.1)) + _sp(16 * (0.1 - 0.6 + 0.1))) / 2
    r1 = _sp(16 * (0.2 - 0.5 + 0.1))
    assert (r0 + r1) / 2 == pytest.approx(0.03038, abs=1e-5)  # worked out on paper
    term = LOSSES.get("dwml_rank")(None)
    value = term(Output(torch.zeros(3, 3), {"similarity": m}), {"target": y, "mask": mask})
    assert value.item() == pytest.approx(0.03038, abs=1e-5)
    value.backward()
    assert m.grad[0, 0] < 0 and m.grad[1, 0] > 0 and m.grad[2, 0] > 0  # positive up, negatives down
    assert m.grad[1, 1] < 0 and m.grad[0, 1] > 0 and m.grad[2, 1] == 0 and (m.grad[:, 2] == 0).all()
    # a label with both sides present counts equally, whatever its number of pairs
    alone = ranking_loss(m.detach()[:, :1], y[:, :1], mask[:, :1])
    assert alone.item() == pytest.approx(r0, rel=1e-5)
    # nothing to rank: 0, still differentiable
    none = ranking_loss(m[:, 2:], y[:, 2:], mask[:, 2:])
    assert none.item() == 0.0 and none.requires_grad
    z = m.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ranking_loss(v, y.double(), mask.double()), z)
    objective = Objective({"dwml": {}, "dwml_rank": 0.5}, ctx([1, 2, 1], [2, 1, 2]))
    total, parts = objective(Output(torch.zeros(3, 3), {"similarity": m.detach()}), {"target": y, "mask": mask})
    assert parts["dwml_rank"] == pytest.approx(0.03038, abs=1e-5)
    assert total.item() == pytest.approx(parts["dwml"] + 0.5 * parts["dwml_rank"], rel=1e-5)
    with pytest.raises(CxrlabError, match="margin >= 0"):
        LOSSES.get("dwml_rank")(None, margin=-0.1)


def test_euclidean_and_dot_scores_by_hand():
    head = PrototypeHead(D, 3, dim=2, metric="euclidean")
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # 1 − ½‖z − q‖²: ‖·‖² = [[0, 2, 1], [5, 1, 2]]
    torch.testing.assert_close(head.scores(z, q), torch.tensor([[1.0, 0.0, 0.5], [-1.5, 0.5, 0.0]]))
    dot = PrototypeHead(D, 3, dim=2, metric="dot")
    r = 2 ** -0.5
    torch.testing.assert_close(dot.scores(z, torch.nn.functional.normalize(q, dim=1)),
                               torch.tensor([[1.0, 0.0, r], [0.0, 2.0, 2 * r]]))
    # on unit vectors the euclidean score is the cosine
    u, v = F.normalize(torch.randn(4, 2), dim=1), F.normalize(q, dim=1)
    torch.testing.assert_close(head.scores(u, v), u @ v.t())
    # through forward: embeddings and prototypes are not normalised, similarity is 1 − ½ distance²
    torch.manual_seed(0)
    for metric in ("euclidean", "dot"):
        h = PrototypeHead(D, C, dim=8, hidden=16, metric=metric)
        h.set_label_text(np.random.default_rng(0).standard_normal((C, 6)) * 3)
        out = h(torch.randn(5, D, 3, 3))
        e, p = out.extras["embedding"], out.extras["prototypes"]
        assert not torch.allclose(e.norm(dim=1), torch.ones(5))
        expected = 1 - 0.5 * torch.cdist(e, p) ** 2 if metric == "euclidean" else e @ p.t()
        torch.testing.assert_close(out.extras["similarity"], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits, h.kappa * out.extras["similarity"] + h.bias)
        assert torch.allclose(p.norm(dim=1), torch.ones(C)) == (metric == "dot")
    with pytest.raises(CxrlabError, match="did you mean 'euclidean'"):
        PrototypeHead(D, C, metric="euclid")


def test_frozen_text_projection_is_unchanged_by_an_optimiser_step():
    def step(head):
        opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
        before = {k: v.clone() for k, v in head.state_dict().items()}
        y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        loss = DWML(ctx([1, 1, 1], [1, 1, 1]))(head(torch.randn(2, D, 3, 3)), {"target": y, "mask": torch.ones(2, 3)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        return before, head.state_dict()

    torch.manual_seed(0)
    frozen = PrototypeHead(D, C, dim=8, hidden=16, freeze_text=True)
    frozen.set_label_text(np.random.default_rng(0).standard_normal((C, 6)))
    before, after = step(frozen)
    assert torch.equal(before["text_proj.weight"], after["text_proj.weight"])
    assert not torch.equal(before["embed.1.weight"], after["embed.1.weight"])  # the image side moved
    torch.manual_seed(0)
    trained = PrototypeHead(D, C, dim=8, hidden=16)
    trained.set_label_text(np.random.default_rng(0).standard_normal((C, 6)))
    before, after = step(trained)
    assert not torch.equal(before["text_proj.weight"], after["text_proj.weight"])  # the control: it would move
    # a bare head rebuilt from the state dict keeps it frozen; the cxrlab optimiser leaves it out
    from cxrlab.engine.optim import param_groups

    bare = PrototypeHead(D, C, dim=8, hidden=16, freeze_text=True)
    bare.load_state_dict(frozen.state_dict())
    assert not bare.text_proj.weight.requires_grad
    grouped = {id(p) for g in param_groups({"head": bare}, None, 1e-3, 1e-4) for p in g["params"]}
    assert id(bare.text_proj.weight) not in grouped and id(bare.embed[1].weight) in grouped
    with pytest.raises(CxrlabError, match="freeze_text must be true or false"):
        PrototypeHead(D, C, freeze_text="yes")


def test_focal_entry_weights_by_hand():
    m = torch.tensor([[0.6, 0.0], [0.2, 0.4]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    batch = {"target": y, "mask": torch.ones(2, 2)}
    focal = DWML(ctx([1, 1], [1, 1]), category_power=0.0, image_weight="none", entry_weight="focal", gamma=2.0)
    p = lambda s: _sig(16 * (s - 0.3))  # noqa: E731
    hard = [[(1 - p(0.6)) ** 2, p(0.0) ** 2], [p(0.2) ** 2, (1 - p(0.4)) ** 2]]
    mean = sum(map(sum, hard)) / 4
    u = [[h / mean for h in row] for row in hard]
    # the two entries on the wrong side of their margin (a negative at 0.2, a positive at 0.4) go up
    assert u[1][0] > 1 and u[1][1] > 1 and u[0][0] < 1 and u[0][1] < 1
    ell = [[_sp(16 * (0.5 - 0.6)), _sp(16 * (0.0 - 0.1))], [_sp(16 * (0.2 - 0.1)), _sp(16 * (0.5 - 0.4))]]
    expected = sum((u[i][0] * ell[i][0] + u[i][1] * ell[i][1]) / 2 for i in range(2)) / 2
    value = focal(Output(torch.zeros(2, 2), {"similarity": m}), batch)
    assert math.isclose(value.item(), expected, rel_tol=1e-5)
    torch.testing.assert_close(focal.entry_weights(m.detach(), y, torch.ones(2, 2)), torch.tensor(u))
    # detached: the gradient is the plain loss's, entry by entry scaled by u
    plain = DWML(ctx([1, 1], [1, 1]), category_power=0.0, image_weight="none")
    g_focal = torch.autograd.grad(focal(Output(torch.zeros(2, 2), {"similarity": m}), batch), m)[0]
    g_plain = torch.autograd.grad(plain(Output(torch.zeros(2, 2), {"similarity": m}), batch), m)[0]
    torch.testing.assert_close(g_focal, torch.tensor(u) * g_plain)
    # γ = 0 is no weighting
    flat = DWML(ctx([1, 1], [1, 1]), category_power=0.0, image_weight="none", entry_weight="focal", gamma=0.0)
    torch.testing.assert_close(flat(Output(torch.zeros(2, 2), {"similarity": m}), batch),
                               plain(Output(torch.zeros(2, 2), {"similarity": m}), batch))
    with pytest.raises(CxrlabError, match="did you mean 'focal'"):
        DWML(ctx([1], [1]), entry_weight="focla")
    with pytest.raises(CxrlabError, match="gamma >= 0"):
        DWML(ctx([1], [1]), entry_weight="focal", gamma=-1.0)


NEW_DWML_RECIPES = ["dwml_synthetic_rank", "dwml_synthetic_euclid", "dwml_synthetic_frozen_text",
                    "dwml_synthetic_faithful"]



@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    import cxrlab.evaluation.report as report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_report", _no_plots)
        yield tmp_path_factory.mktemp("dwml_smoke")


@pytest.mark.parametrize("recipe", NEW_DWML_RECIPES)
def test_new_dwml_recipes_train_one_epoch(recipe, smoke_dir, one_thread):
    from safetensors.torch import load_file

    from cxrlab.config import load_recipe
    from cxrlab.inference.prototypes import prototype_similarities
    from cxrlab.workflows.train import train

    over = ["data.source=synthetic:300", "data.image_size=32", "model.backbone=test_resnet", "train.epochs=1",
            "train.batch_size=64", "eval.bootstrap=0", f"data.cache_dir={smoke_dir / 'cache'}"]
    train(recipe, smoke_dir / recipe, over)
    weights = load_file(str(smoke_dir / recipe / "best" / "model.safetensors"))
    loaded = load_recipe(recipe)
    if loaded.model.head_args.get("freeze_text"):  # the projection is still its orthogonal start
        w = weights["model.head.text_proj.weight"].double()
        torch.testing.assert_close(w @ w.t(), torch.eye(w.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
    if loaded.model.head_args.get("metric") == "euclidean":  # `cxrlab prototypes` still gives cosines
        cos = prototype_similarities(smoke_dir / recipe)["prototypes"]
        np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-6)
