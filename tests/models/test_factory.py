"""Model factory: names, construction, weight files and every way loading one can fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

import kdpipe.models.weights as weights
from kdpipe.errors import ConfigError, DataError
from kdpipe.models import (
    check_model_name,
    count_params,
    create_model,
    list_kdpipe_models,
    list_models,
    load_weights,
    read_weights_metadata,
    save_weights,
)
from kdpipe.models.factory import HeadChange, create_model_with_info, weight_source_files


class NotATensor:
    """Stands in for any object a pickle would have to import and construct."""


def _model(name: str = "resnet8", seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=kwargs.pop("num_classes", 100), **kwargs).eval()  # type: ignore[arg-type]


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, in_chans: int = 3) -> bool:
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# --- names ---


def test_list_models_includes_timm_and_kdpipe() -> None:
    names = list_models()
    assert {"resnet18", "resnet8x4", "wrn_40_2", "mobilenetv2_x0_5_cifar"} <= set(names)
    assert list_models("wrn_*") == ["wrn_16_1", "wrn_16_2", "wrn_16_8", "wrn_40_1", "wrn_40_2"]
    assert list_models("vgg*_cifar") == [f"vgg{d}_cifar" for d in (8, 11, 13, 16, 19)]


def test_list_kdpipe_models() -> None:
    ours = list_kdpipe_models()
    assert len(ours) == 23
    assert "resnet18" not in ours and "resnet32x4" in ours
    # timm's ImageNet resnet50 / vgg13 stay timm's; the CIFAR variants carry a suffix.
    assert {"resnet50_cifar", "vgg13_cifar", "shufflenet_v1", "shufflenet_v2"} <= set(ours)
    assert "resnet50" not in ours and "vgg13" not in ours
    assert all(timm.is_model(n) for n in ours)


@pytest.mark.parametrize("name", ["resnet8x4", "resnet18", "resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k"])
def test_check_model_name_accepts(name: str) -> None:
    check_model_name(name, "stages.teacher.model")


def test_check_model_name_suggests_and_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("check_model_name must not construct a model")

    monkeypatch.setattr(timm, "create_model", no_build)
    with pytest.raises(ConfigError) as err:
        check_model_name("resnet8x5", "stages.distill.student")
    text = str(err.value)
    assert text.startswith("stages.distill.student: unknown model 'resnet8x5' (did you mean 'resnet8x4'?)")
    assert "kdpipe list models" in text
    assert err.value.exit_code == 2


# --- construction ---


def test_create_model_sets_classes_and_channels() -> None:
    model = create_model("wrn_16_1", num_classes=10, in_chans=1)
    assert model.num_classes == 10 and model.in_chans == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_create_model_unknown_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'wrn_40_2'"):
        create_model("wrn_40_3", num_classes=100)


def test_create_model_pretrained_without_published_weights() -> None:
    with pytest.raises(ConfigError, match="no published pretrained weights") as err:
        create_model("resnet8x4", num_classes=100, pretrained=True)
    assert "checkpoint" in str(err.value)


def test_create_model_pretrained_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_a: object, **_k: object) -> None:
        raise LocalEntryNotFoundError("cannot reach the Hugging Face hub")

    monkeypatch.setattr(timm, "create_model", offline)  # never touch the network in tests
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ConfigError, match="pretrained weights could not be downloaded") as err:
        create_model("resnet18", num_classes=10, pretrained=True)
    assert "weights: {checkpoint: " in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert isinstance(err.value.__cause__, LocalEntryNotFoundError)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE is set .* \(timm/resnet18.a1_in1k\) are not in the local"):
        create_model("resnet18", num_classes=10, pretrained=True)


def test_create_model_rejects_two_weight_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both pretrained weights and a checkpoint"):
        create_model("resnet18", num_classes=10, pretrained=True, checkpoint=tmp_path / "w.safetensors")


def test_create_model_loads_checkpoint(tmp_path: Path) -> None:
    source = _model("resnet8", seed=1, num_classes=10)
    path = save_weights(source, tmp_path / "w.safetensors", {})
    assert _same_outputs(source, create_model("resnet8", num_classes=10, checkpoint=path))


def test_count_params() -> None:
    model = _model("resnet8")
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    model.fc.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - 64 * 100 - 100


# --- saving and loading ---


def test_safetensors_round_trip(tmp_path: Path) -> None:
    source = _model("mobilenetv2_x0_5_cifar", seed=1, num_classes=10, in_chans=1)
    path = save_weights(source, tmp_path / "sub" / "student.safetensors", {"kd_method": "dkd"})
    assert [p.name for p in path.parent.iterdir()] == ["student.safetensors"]  # no temporary file left behind
    expected_meta = {"arch": "mobilenetv2_x0_5_cifar", "num_classes": "10", "in_chans": "1", "kd_method": "dkd"}
    assert expected_meta.items() <= read_weights_metadata(path).items()
    target = _model("mobilenetv2_x0_5_cifar", seed=2, num_classes=10, in_chans=1)
    assert expected_meta.items() <= load_weights(target, path).items()
    assert _same_outputs(source, target, in_chans=1)


def test_save_weights_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_weights(_model("resnet8", seed=1), tmp_path / "w.safetensors", {"run": "first"})

    def crash(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_weights(_model("resnet8", seed=2), path, {"run": "second"})
    assert read_weights_metadata(path)["run"] == "first"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_save_weights_rejects_contradicting_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        save_weights(_model("resnet8"), tmp_path / "w.safetensors", {"num_classes": "10"})


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "model_state_dict"])
def test_torch_file_round_trip(tmp_path: Path, suffix: str, layout: str) -> None:
    source = _model("resnet8", seed=1)
    # Keys as DistributedDataParallel writes them; nested files carry scalars beside the weights (CRD style).
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    obj = state if layout == "bare" else {layout: state, "epoch": 240, "best_acc": torch.tensor(79.5)}
    path = tmp_path / f"w{suffix}"
    torch.save(obj, path)
    target = _model("resnet8", seed=2)
    meta = load_weights(target, path)
    assert _same_outputs(source, target)
    assert meta == ({} if layout == "bare" else {"epoch": "240", "best_acc": "79.5"})


def test_pretrained_cfg_overlay_file_through_timm(tmp_path: Path) -> None:
    source = _model("resnet8x4", seed=1)
    path = save_weights(source, tmp_path / "teacher.safetensors", {})
    loaded = timm.create_model("resnet8x4", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert _same_outputs(source, loaded)
    # Another head size: timm drops the file's classifier (named by the pretrained cfg) and keeps the trunk.
    torch.manual_seed(3)
    head10 = timm.create_model("resnet8x4", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head10.eval().forward_features(x), source.forward_features(x))
    # One input channel: timm folds the file's RGB stem (named by first_conv) into a grayscale one.
    gray = timm.create_model("mobilenetv2_x0_5_cifar", in_chans=1, num_classes=10)
    gray_path = save_weights(_model("mobilenetv2_x0_5_cifar"), tmp_path / "mnv2.safetensors", {})
    adapted = timm.create_model(
        "mobilenetv2_x0_5_cifar", pretrained=True, pretrained_cfg_overlay={"file": str(gray_path)}, in_chans=1
    )
    assert adapted.conv1[0].weight.shape == gray.conv1[0].weight.shape


# --- load errors: a DataError that names the file and the fix ---


def _load_error(path: Path, model: torch.nn.Module | None = None) -> str:
    with pytest.raises(DataError) as err:
        load_weights(model if model is not None else _model("resnet8"), path)
    assert err.value.exit_code == 3
    text = str(err.value)
    assert str(path) in text
    return text


def test_load_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_text_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    path.write_text("model: resnet8x4\nweights: {train: {epochs: 240}}\n")
    text = _load_error(path)
    assert "not a PyTorch checkpoint" in text or "not a valid safetensors file" in text


def test_load_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "stages.yaml"
    path.write_text("version: 1\n")
    assert "unsupported weight file type '.yaml'" in _load_error(path)


def test_load_truncated_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_model("resnet8").state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated or corrupt" in _load_error(path)


def test_load_truncated_safetensors(tmp_path: Path) -> None:
    path = save_weights(_model("resnet8"), tmp_path / "w.safetensors", {})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in _load_error(path)
    with pytest.raises(DataError):
        read_weights_metadata(path)


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"model": _model("resnet8").state_dict(), "config": NotATensor()}, path)
    text = _load_error(path)
    assert "refused" in text and "NotATensor" in text
    assert "torch.save(model.state_dict()" in text  # the fix


def test_load_file_without_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    assert "holds no state_dict" in _load_error(path)


def test_load_wrong_num_classes(tmp_path: Path) -> None:
    path = save_weights(_model("resnet8", num_classes=10), tmp_path / "w.safetensors", {})
    text = _load_error(path, _model("resnet8", num_classes=100))
    assert "2 shape mismatch(es)" in text and "fc.weight: file (10, 64) vs model (100, 64)" in text
    assert "was it trained with num_classes=10?" in text


def test_load_wrong_in_chans(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_model("resnet8", in_chans=1).state_dict(), path)
    assert "was it trained with in_chans=1?" in _load_error(path)


def test_load_other_architecture(tmp_path: Path) -> None:
    path = save_weights(_model("resnet8"), tmp_path / "w.safetensors", {})
    text = _load_error(path, _model("resnet20"))
    assert "missing key(s)" in text and "layer1.1.conv1.weight" in text
    assert "saved from 'resnet8'" in text


def test_load_other_architecture_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(_model("wrn_16_1").state_dict(), path)
    text = _load_error(path)
    assert "missing key(s)" in text and "unexpected key(s)" in text


def test_read_metadata_of_plain_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert read_weights_metadata(path) == {}


# --- pretrained weights: head adaptation, hub folders, the offline hub cache ---


def _body_equal(a: torch.nn.Module, b: torch.nn.Module, head: str = "fc.") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], v) for k, v in sb.items() if not k.startswith(head))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_with_another_class_count_gets_a_fresh_head(tmp_path: Path, suffix: str) -> None:
    source = _model("resnet10t", seed=1, num_classes=1000)
    path = tmp_path / f"in1k{suffix}"
    save_weights(source, path, {}) if suffix == ".safetensors" else torch.save(
        {"state_dict": source.state_dict()}, path
    )
    torch.manual_seed(0)
    model, info = create_model_with_info("resnet10t", num_classes=10, checkpoint=path)
    assert _body_equal(model, source)  # every other tensor is the file's
    assert model.state_dict()["fc.weight"].shape == (10, 512)
    torch.manual_seed(0)
    fresh = create_model("resnet10t", num_classes=10)
    assert torch.equal(model.state_dict()["fc.weight"], fresh.state_dict()["fc.weight"])  # timm's own init
    assert info.head == HeadChange(1000, 10, ("fc",)) and info.pretrained
    assert info.as_dict()["head"] == {"adapted": True, "file_classes": 1000, "classes": 10, "layers": ["fc"]}
    assert info.preprocessing == {}  # a bare state_dict carries none


def test_checkpoint_with_the_same_class_count_loads_exactly(tmp_path: Path) -> None:
    source = _model("resnet10t", seed=1, num_classes=10)
    model, info = create_model_with_info(
        "resnet10t", num_classes=10, checkpoint=save_weights(source, tmp_path / "w.safetensors", {})
    )
    assert _same_outputs(source, model) and info.head is None


@pytest.mark.parametrize(
    ("name", "head"),
    [("mobilenetv3_small_050", "classifier."), ("convnext_atto", "head.fc."), ("regnetx_002", "head.fc.")],
)
def test_head_adaptation_follows_each_family_s_classifier(tmp_path: Path, name: str, head: str) -> None:
    source = _model(name, seed=1, num_classes=1000)
    model, info = create_model_with_info(
        name, num_classes=7, checkpoint=save_weights(source, tmp_path / "w.safetensors", {})
    )
    assert _body_equal(model, source, head) and info.head is not None and info.head.classes == 7


def test_a_mismatch_outside_the_head_is_still_refused(tmp_path: Path) -> None:
    source = _model("resnet10t", num_classes=1000)
    state = dict(source.state_dict())
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:, :32]
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(DataError, match="1 shape mismatch") as err:
        create_model_with_info("resnet10t", num_classes=10, checkpoint=path)
    assert "fc.weight" not in str(err.value)  # the head is not the problem
    with pytest.raises(DataError, match="missing key"):
        create_model_with_info(
            "resnet14t", num_classes=10, checkpoint=save_weights(source, tmp_path / "r10.safetensors", {})
        )


def _hub_folder(tmp_path: Path, model: torch.nn.Module, name: str = "hub") -> Path:
    folder = tmp_path / name
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)}
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    return folder


def test_timm_hub_folder_with_its_preprocessing(tmp_path: Path) -> None:
    source = _model("resnet10t", seed=2, num_classes=1000)
    folder = _hub_folder(tmp_path, source)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model, info = create_model_with_info("resnet10t", num_classes=10, checkpoint=folder)
    assert _body_equal(model, source) and info.head == HeadChange(1000, 10, ("fc",))
    assert info.preprocessing["mean"] == [0.5, 0.4, 0.3] and info.preprocessing["input_size"][0] == 3
    assert info.source == f"timm folder {folder}"
    assert weight_source_files(folder) == [folder / "config.json", folder / "model.safetensors"]


def test_timm_hub_folder_errors(tmp_path: Path) -> None:
    folder = _hub_folder(tmp_path, _model("resnet10t", num_classes=1000))
    with pytest.raises(ConfigError, match="holds a 'resnet10t'") as err:
        create_model_with_info("resnet14t", num_classes=10, checkpoint=folder)
    assert "set the model to 'resnet10t'" in err.value.hint
    (folder / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"has a config\.json but no weights"):
        create_model_with_info("resnet10t", num_classes=10, checkpoint=folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a timm hub folder"):
        create_model_with_info("resnet10t", num_classes=10, checkpoint=tmp_path / "empty")


def test_pretrained_head_change_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real = timm.create_model
    # No download: the loading itself is the offline hub cache test's; this one checks what is reported.
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: real(name, **{**kw, "pretrained": False}))
    _, info = create_model_with_info("resnet10t.c3_in1k", num_classes=5, pretrained=True)
    assert info.head == HeadChange(1000, 5, ("fc",)) and info.source == "timm pretrained resnet10t.c3_in1k"
    assert info.preprocessing["interpolation"] == "bicubic" and info.preprocessing["input_size"] == [3, 176, 176]
    _, same = create_model_with_info("resnet10t.c3_in1k", num_classes=1000, pretrained=True)
    assert same.head is None


def test_hf_hub_repo_preprocessing_comes_from_the_cached_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``hf-hub:`` name's mean/std, input size, crop and filter are its config.json's, read from the local hub
    cache (conftest sets HF_HUB_OFFLINE, so nothing is downloaded); an uncached repository is simply unknown."""
    import json

    from huggingface_hub import constants

    from kdpipe.models.factory import expected_preprocessing

    revision = "1" * 40
    folder = tmp_path / "models--someone--tiny-resnet"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    pretrained_cfg = {
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.2, 0.2],
        "input_size": [3, 160, 160],
        "crop_pct": 0.9,
        "interpolation": "bicubic",
    }
    config = {"architecture": "resnet10t", "num_classes": 7, "pretrained_cfg": pretrained_cfg}
    (folder / "snapshots" / revision / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    pre = expected_preprocessing("hf-hub:someone/tiny-resnet", pretrained=True)
    expected = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2), "image_size": 160, "crop_pct": 0.9}
    assert pre == {**expected, "interpolation": "bicubic"}
    assert expected_preprocessing("hf-hub:someone/not-cached", pretrained=True) == {}
    assert expected_preprocessing("hf-hub:someone/tiny-resnet", pretrained=False) == {}
