"""training.analyses and stage 1 on VQ tokens, on a tiny synthetic run (16x16 images, 3 classes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_core.codebook import fit_kmeans
from digit_core.config import ConfigError
from digit_core.presets import imagenet_base, tiny
from digit_core.demo import keep_rows_for
from digit_core.pipeline import DiGIT
from training.config import RunConfig, parse_config
from training.data import model_config
from training.files import atomic_save, load_tensors

CLASSES = ["class0", "class1", "class2"]
SMALL = ["--batch=8", "--n_stability=6", "--n_probe_train=24", "--n_probe_test=8", "--n_control_fit=12",
         "--n_per_class=2", "--n_complete=4", "--prefixes=12.5,25,50,75", "--device=cpu"]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def tiny_model(folder: Path, codebook_size: int = 0, seed: int = 0) -> DiGIT:
    """An untrained tiny DiGIT whose codebook is K-Means on its own encoder's features."""
    torch.manual_seed(seed)
    cfg = model_config(RunConfig(model="tiny", codebook_size=codebook_size), CLASSES)
    model = DiGIT(cfg)
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))[:12]])
    feats = model.tokenize(imgs)[2]
    model.codebook.set_centroids(fit_kmeans(feats.reshape(-1, feats.shape[-1]), cfg.codebook.size, seed=seed))
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/{model, vqgan, ssl, stage1_vq} and a second run with K=8 for the per-layer probe that
    has only kmeans/ and stage1/ (the probe needs no stage 2); the images are
    <root>/images/<class>/<i>.png (16x16, brighter by class so a classifier learns)."""
    from training import stage1
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    for i in range(60):
        c = i % 3
        d = root / "images" / CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        img = np.clip(rng.normal(60 + 70 * c, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i}.png")
    model = tiny_model(root / "images")
    model.config.encoder.source = "random init (test)"   # as assemble records the encoder file's source
    model.save(root / "model")
    atomic_save(model.vqgan.state_dict(), root / "vqgan/vqgan.safetensors")
    atomic_save(model.encoder.state_dict(), root / "ssl/encoder.safetensors", {"source": "random init (test)"})
    k8 = tiny_model(root / "images", codebook_size=8)      # seed 0: the same encoder as the main run
    atomic_save({"centroids": k8.codebook.centroids}, root / "k8/kmeans/codebook.safetensors")
    atomic_save(k8.stage1.state_dict(), root / "k8/stage1/stage1.safetensors", {"model": k8.config.to_dict()})
    (root / "k8/stage1/train_config.json").write_text(json.dumps(
        {"encoder": str(root / "ssl/encoder.safetensors"), "codebook": ""}))
    conv = tiny(3)
    conv.encoder.stem = "conv"
    torch.manual_seed(1)
    atomic_save(DiGIT(conv).encoder.state_dict(), root / "conv/ssl/encoder.safetensors",
                {"model": conv.to_dict(), "source": "conv stem (test)"})
    stage1.main([f"--root={root}", f"--data={root / 'images'}", "--model=tiny", "--batch_size=8", "--workers=0",
                 "--steps=3", "--tokens=vq"])
    return root


# -- stage 1 on VQ tokens ------------------------------------------------------------------------------------
def test_tokens_option_is_checked_and_gets_its_own_run_dir() -> None:
    from training.stage1 import Stage1TrainConfig
    assert parse_config(Stage1TrainConfig, ["--tokens=vq"]).stage == "stage1_vq"
    assert parse_config(Stage1TrainConfig, []).stage == Stage1TrainConfig.stage == "stage1"
    with pytest.raises(ConfigError, match="tokens must be one of"):
        parse_config(Stage1TrainConfig, ["--tokens=pixels"])


def test_vq_stage1_trains_on_vq_ids_and_samples_decode(root: Path) -> None:
    from training.assemble import vq_model
    tensors, meta = load_tensors(root / "stage1_vq/stage1.safetensors")
    assert meta["tokens"] == "vq" and meta["model"]["tokens"] == "vq" and meta["model"]["encoder"] is None
    assert meta["model"]["stage1"]["gpt"]["num_out"] == tiny().vqgan.n_embed == 32
    cache = load_tensors(root / "stage1_vq/tokens.safetensors")[0]
    assert cache["vq"].shape == (120, 16) and 0 <= cache["vq"].min() and cache["vq"].max() < 32   # 60 images + mirrors
    vq = vq_model(root / "stage1_vq/stage1.safetensors", root / "vqgan/vqgan.safetensors")
    # the cached tokens are what the model's tokenizer gives (the VQGAN encoder)
    img = np.asarray(Image.open(root / "images/class0/0.png").convert("RGB"))
    assert np.array_equal(vq.vq_tokenize(img[None])[0].ravel(), cache["vq"][0].long().numpy())
    with pytest.raises(ValueError, match="VQ-token model"):
        vq.tokenize(img[None])
    g = vq.generate([0, 1, 2], seed=0, cfg_scale=1.5)
    assert g.images.shape == (3, 16, 16, 3) and g.images.dtype == np.uint8
    assert np.array_equal(g.vq_tokens, g.disc_tokens)                   # no stage 2: the codes are VQ ids
    assert np.array_equal(g.images, vq.decode_vq(g.vq_tokens))
    done = vq.complete_detailed(img, keep_rows=2, n=2, seed=0)
    assert np.array_equal(done.vq_tokens[:, :2], np.repeat(vq.vq_tokenize(img[None])[:, :2], 2, 0))


def test_vq_model_refuses_a_disc_stage1(root: Path, tmp_path: Path) -> None:
    from digit_core.presets import vq_baseline
    from training.assemble import vq_model
    model = DiGIT.load(root / "model")
    atomic_save(model.stage1.state_dict(), tmp_path / "s1.safetensors", {"model": model.config.to_dict(), "tokens": "disc"})
    with pytest.raises(ValueError, match="not VQ ids"):
        vq_model(tmp_path / "s1.safetensors", root / "vqgan/vqgan.safetensors")
    with pytest.raises(ConfigError, match="not the VQGAN's 32 codes"):
        vq_baseline(model.config)


# -- pieces ----------------------------------------------------------------------------------------------------
def test_hidden_states_one_per_layer_and_the_last_feeds_the_head() -> None:
    from digit_core.gpt import GPT
    torch.manual_seed(0)
    gpt = GPT(tiny().stage1.gpt).eval()
    idx = torch.randint(0, 16, (2, 16))
    states = gpt.hidden_states(idx)
    assert len(states) == gpt.cfg.n_layer + 1 and all(s.shape == (2, 16, gpt.cfg.d_model) for s in states)
    assert torch.allclose(gpt.head(gpt.ln_f(states[-1])), gpt(idx), atol=1e-5)


def test_probe_first_token_never_carries_the_label() -> None:
    from training.analyses.probe import label_free_first
    cfg = tiny(3)
    assert label_free_first(cfg)[0] == cfg.stage1.null_class_id
    assert label_free_first(tiny(0))[0] == tiny(0).stage1.bos_id
    with pytest.raises(ValueError, match="null class"):
        label_free_first(imagenet_base())              # fairseq layout: no null class


def test_probe_model_from_a_stage1_run_without_stage2(root: Path) -> None:
    from training.analyses.probe import probe_model
    model, part = DiGIT.load(root / "model"), probe_model(root / "k8", torch.device("cpu"))
    assert part.config.codebook.size == 8
    assert torch.equal(part.codebook.centroids, load_tensors(root / "k8/kmeans/codebook.safetensors")[0]["centroids"])
    img = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / "images").rglob("*.png"))[:2]])
    assert np.allclose(part.tokenize(img)[2], model.tokenize(img)[2], atol=1e-5)   # the encoder train_config names


def test_control_codebook_is_fit_on_random_init_features(root: Path) -> None:
    from training.analyses.stability import kmeans_model
    model = DiGIT.load(root / "model")
    fit = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / "images").rglob("*.png"))[:16]])
    control = kmeans_model(model, fit, seed=3, batch=8)
    K = model.config.codebook.size
    assert control.codebook.centroids.shape == (K, model.config.encoder.width)
    ours, ctrl = model.own_state_dict(), control.own_state_dict()
    assert not torch.equal(ours["encoder.vit.patch_embed.proj.weight"], ctrl["encoder.vit.patch_embed.proj.weight"])
    assert all(torch.equal(ours[k], ctrl[k]) for k in ours if k.startswith(("vqgan.", "stage1.", "stage2.")))
    # the centroids fit the control's own features far better than ours do
    feats = torch.from_numpy(control.tokenize(fit)[2])
    own, other = control.codebook.assign(feats)[1].mean(), model.codebook.assign(feats)[1].mean()
    assert own < 0.5 * other


# -- the CLI end to end ---------------------------------------------------------------------------------------
def test_every_analysis_writes_its_report(root: Path, tmp_path: Path) -> None:
    from training.analyses.__main__ import main
    out = tmp_path / "report"
    main([f"--root={root}", f"--data={root / 'images'}", "--name=tiny", f"--out={out}",
          f"--classifier={tmp_path / 'clf.safetensors'}", f"--probe_roots={root / 'k8'}",
          f"--encoders=conv={root / 'conv/ssl/encoder.safetensors'}", *SMALL])
    for key in ("stability", "probe", "ablation", "ssl_type", "completion"):
        for ext in ("json", "html", "png", "md"):
            assert (out / f"{key}.{ext}").stat().st_size > 0, f"{key}.{ext}"
    readme = (out / "README.md").read_text()
    assert all(t in readme for t in ("Table 1", "Figure 3b", "Table 3a", "Table 4a", "Figure 4b"))
    assert not (out / "plotly.min.js").exists() and (tmp_path / "clf.safetensors").exists()

    s = json.loads((out / "stability.json").read_text())
    assert s["snr_db"] == [30.0, 25.0, 20.0, 15.0, 10.0, 5.0, 1.0, 0.01] and s["num_images"] == 6
    for curve in (s["ours"]["disc_change"], s["ours"]["vq_change"], s["control"]["disc_change"]):
        assert len(curve) == 8 and all(0 <= v <= 1 for v in curve)
    assert all(-1 <= v <= 1 for v in s["ours"]["disc_cos_sim"] + s["control"]["disc_cos_sim"])
    assert s["control_vq_matches"] and s["encoder_source"] == "random init (test)"
    accs = [v for p in s["probe"].values() for v in p.values()]
    assert len(accs) == 7 and all(0 <= a <= 1 for a in accs)

    p = json.loads((out / "probe.json").read_text())
    assert [m["codebook_size"] for m in p["models"]] == [8, 16]
    for m in p["models"]:
        assert len(m["accuracy"]) == m["n_layer"] + 1 == 3 and all(0 <= a <= 1 for a in m["accuracy"])
        assert m["first_token"].startswith("null class")

    a = json.loads((out / "ablation.json").read_text())
    assert set(a["scores"]) == {"real", "recon", "digit", "vq"}
    assert all(np.isfinite(v["fd"]) and v["fd"] >= 0 and 0 <= v["class_accuracy"] <= 1 for v in a["scores"].values())
    # both models sampled with DiGIT's resolved stage-1 defaults (tiny: all off)
    assert a["budget"]["vq"]["steps"] == 3 and a["cfg_scale"] == 1.0
    assert a["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0}
    assert Image.open(out / "ablation_digit.png").size == Image.open(out / "ablation_vq.png").size

    t = json.loads((out / "ssl_type.json").read_text())
    names = [r["tokenizer"] for r in t["tokenizers"]]
    assert names == ["ours", "conv", "random-init control", "random-init control (conv stem)",
                     "VQGAN latents + K-Means", "VQGAN ids"]
    assert [r["stem"] for r in t["tokenizers"]] == ["patch", "conv", "patch", "conv", None, None]
    for r in t["tokenizers"]:
        assert len(r["change"]) == 8 and all(0 <= v <= 1 for v in r["change"])
        assert 0 <= r["probe_tokens"] <= 1 and 0 <= r["probe_features"] <= 1
    assert t["tokenizers"][1]["source"] == "conv stem (test)" and t["tokenizers"][4]["usage"]["codes"] == 16
    # the same noise for every tokenizer: the VQ ids change exactly as in the stability section
    assert np.allclose(t["tokenizers"][5]["change"], s["ours"]["vq_change"])
    assert np.allclose(t["tokenizers"][0]["change"], s["ours"]["disc_change"])

    c = json.loads((out / "completion.json").read_text())
    assert c["prefix_percent"] == [12.5, 25.0, 50.0, 75.0]
    assert c["keep_rows"] == [keep_rows_for(q, 4) for q in c["prefix_percent"]] and c["grid"] == 4
    for k in ("digit", "vq"):
        assert len(c[k]["fd"]) == 4 and all(0 <= v <= 1 for v in c[k]["agreement"]) and min(c[k]["fd"]) >= 0


def test_encoders_option_names_its_format(root: Path, tmp_path: Path) -> None:
    from training.analyses.__main__ import main
    with pytest.raises(ValueError, match="LABEL=PATH"):
        main([f"--root={root}", f"--data={root / 'images'}", f"--out={tmp_path}", "--only=ssl_type",
              f"--encoders={root / 'conv/ssl/encoder.safetensors'}", *SMALL])


def test_only_names_a_missing_run_is_an_error(root: Path, tmp_path: Path) -> None:
    from training.analyses.__main__ import main
    with pytest.raises(FileNotFoundError, match="stage1 --tokens=vq"):
        main([f"--root={root}", f"--data={root / 'images'}", f"--out={tmp_path}", "--only=ablation",
              f"--vq_stage1={tmp_path / 'none.safetensors'}", *SMALL])
    with pytest.raises(SystemExit):
        main([f"--root={root}", "--only=nonsense"])


# -- the findings are read off the numbers ------------------------------------------------------------------------
def test_findings_follow_the_numbers() -> None:
    from digit_core.metrics import PAPER_TABLE1
    from training.analyses import ablation, completion, stability
    base = {"prefix_percent": [12.5, 75.0], "keep_rows": [1, 6], "grid": 8, "images": "x",
            "digit": {"fd": [2.0, 2.0], "agreement": [0.9, 0.9]}, "paper": ""}
    worse_vq = base | {"vq": {"fd": [8.0, 2.0], "agreement": [0.3, 0.9]}}
    assert "VQ tokens degrade more with a short prefix, as in the paper" in completion.findings(worse_vq)[0]
    same = base | {"vq": {"fd": [2.02, 2.0], "agreement": [0.9, 0.9]}}
    assert "neither degrades" in completion.findings(same)[0]

    scores = lambda dig, vq: {"real": {"fd": 0.1, "class_accuracy": 0.9}, "recon": {"fd": 1.0, "class_accuracy": 0.9},
                              "digit": {"fd": dig, "class_accuracy": 0.8}, "vq": {"fd": vq, "class_accuracy": 0.7}}
    run = {"steps": 10, "batch_size": 4, "params": 1}
    d = {"budget": {"digit": run, "vq": run}, "paper": ablation.PAPER, "cfg_scale": 1.5, "grid": 8, "images": "x"}
    assert ablation.findings(d | {"scores": scores(5.0, 10.0)})[0].endswith("help, as in the paper.")
    assert "hurt here" in ablation.findings(d | {"scores": scores(10.0, 5.0)})[0]

    n = len(PAPER_TABLE1["disc_change"])
    curve = lambda v: {"disc_change": [v] * n, "disc_cos_sim": [0.9] * n}
    ours = curve(0.3) | {"vq_change": [0.5] * n, "vq_cos_sim": [0.8] * n}
    use = {k: {"codes": 16, "used": 16, "perplexity": 10.0} for k in ("ours", "control", "vq")}
    probe = {"ours": {"tokens": 0.8, "features": 0.9}, "control": {"tokens": 0.6, "features": 0.7},
             "vq": {"tokens": 0.5, "features": 0.6}, "pixels": {"features": 0.7}}
    d = {"snr_db": [10.0] * n, "ours": ours, "paper": PAPER_TABLE1, "probe": probe, "code_usage": use,
         "control_vq_matches": True, "encoder_source": "ViT trained here with the labels", "images": "x"}
    text = " ".join(stability.findings(d | {"control": curve(0.31)}))
    assert "about as stable as" in text and "stability alone does not show" in text
    assert "The linear probe separates them" in text and "supervision" in text
    assert "training did make the tokens more stable" in " ".join(stability.findings(d | {"control": curve(0.6)}))


def test_ssl_type_findings_compare_with_the_reconstructive_tokenizer() -> None:
    from training.analyses import ssl_type
    row = lambda name, tok, change, stem="patch": {"tokenizer": name, "source": "s", "stem": stem, "probe_tokens": tok,
                                                   "probe_features": tok, "change": [change] * 8,
                                                   "usage": {"used": 4, "codes": 4}}
    d = {"snr_db": [30.0, 25.0, 20.0, 15.0, 10.0, 5.0, 1.0, 0.01], "paper": ssl_type.PAPER, "codebook_size": 4,
         "fit_images": 1, "probe_images": {"train": 1, "test": 1}, "num_images": 1, "images": "x",
         "tokenizers": [row("ours", 0.8, 0.2), row("worse", 0.5, 0.6), row("random-init control", 0.6, 0.3),
                        row("VQGAN latents + K-Means", 0.6, 0.5, None), row("VQGAN ids", 0.55, 0.7, None)]}
    text = ssl_type.findings(d)
    assert text[0].startswith("Most class information in the tokens: ours") and "most stable at 10 dB: ours" in text[0]
    assert "more stable, as the paper finds" in text[1]
    assert "Against the same architecture untrained: features probe 0.800 vs 0.600 (+20.0 points)" in text[1]
    assert "neither more informative nor more stable, unlike the paper" in text[2]
    assert "| ours | s | 0.800 | 0.800 | 0.200 | 4/4 |" in ssl_type.markdown(d)


def test_probe_findings_compare_k_within_one_encoder_and_encoders_at_equal_k() -> None:
    from training.analyses import probe
    row = lambda k, enc, acc: {"label": f"K={k}, {enc}", "codebook_size": k, "encoder": enc, "n_layer": 2,
                               "accuracy": acc, "best_layer": int(np.argmax(acc)), "first_token": "null class"}
    d = {"models": [row(128, "supervised", [0.5, 0.7, 0.6]), row(512, "supervised", [0.5, 0.8, 0.7]),
                    row(512, "contrastive", [0.5, 0.6, 0.65])], "probe_images": {"train": 1, "test": 1},
         "paper": probe.PAPER}
    text = " ".join(probe.findings(d))
    assert "K=128, supervised 0.700, K=512, supervised 0.800 rises with K" in text
    assert "At K=512, stage 1 over the contrastive encoder's tokens probes 0.650 at best vs 0.800" in text
