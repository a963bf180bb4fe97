"""Issue 35, item 6: the public functions check their arguments and name the Python parameter in a HardenError."""
from __future__ import annotations

import pytest
import torch

import hardener
from hardener.errors import HardenError, InputError

from conftest import ARCH, make_data, trained_tiny


@pytest.fixture(scope="module")
def toy():
    imgs, labels = make_data(n=30)
    return imgs, labels


@pytest.mark.parametrize("kwargs,needle", [
    ({"path": None}, "path"), ({"path": 3.5}, "path"), ({"arch": 42}, "arch"), ({"arch_kwargs": [1, 2]}, "arch_kwargs"),
    ({"arch_kwargs": '{"width": 4}'}, "arch_kwargs"), ({"arch_kwargs": {1: 2}}, "arch_kwargs"),
    ({"trust_arch": 1.0}, "trust_arch"), ({"trust_arch": [None]}, "trust_arch"),
])
def test_load_arguments(patched_ckpt, kwargs, needle):
    kwargs = {"path": patched_ckpt, "arch": ARCH, **kwargs}
    with pytest.raises(InputError, match=needle):
        hardener.load(**kwargs)


@pytest.mark.parametrize("overrides,needle", [
    ({"epochs": "3"}, "epochs"), ({"cache_limit": 2.0}, "cache_limit"), ({"epochs": 2.5}, "epochs"),
    ({"eps": [0.1]}, "eps"), ({"augment": "yes"}, "augment"), ({"steps": True}, "steps"),
    ({"lr": float("inf")}, "lr"), ({"seed": 2 ** 64}, "seed"), ({"seed": -1}, "seed"), ({"epochs": 2 ** 40}, "epochs"),
    ({"bogus": 1}, "bogus"),
])
def test_patch_arguments(toy, overrides, needle):
    with pytest.raises(InputError, match=needle):
        hardener.patch(trained_tiny(steps=1), toy, recipe=None, **overrides)


@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.5] * 15), torch.zeros(30, dtype=torch.bool),
                                    torch.zeros(30, dtype=torch.complex64)])
def test_float_labels_are_refused(toy, labels):
    with pytest.raises(InputError, match="labels must be integer"):
        hardener.as_dataset((toy[0], labels))


@pytest.mark.parametrize("kwargs,needle", [
    ({"attacks": 3}, "attacks"), ({"attacks": []}, "attacks"), ({"attacks": ["fgsm", 3]}, "attacks"),
    ({"threat": ("whitebox", "bogus")}, "threat"), ({"threat": 7}, "threat"), ({"seed": 2 ** 63}, "seed"),
    ({"seed": "0"}, "seed"), ({"eps": None}, "eps"), ({"checks": "no"}, "checks"), ({"steps": True}, "steps"),
    ({"norm": 2}, "norm"),
])
def test_evaluate_arguments(patched_ckpt, toy, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        hardener.evaluate(hardener.load(patched_ckpt, arch=ARCH), toy, **{"attacks": "fgsm", **kwargs})


def test_evaluate_accepts_a_threat_tuple(patched_ckpt, toy):
    rep = hardener.evaluate(hardener.load(patched_ckpt, arch=ARCH), toy, attacks="fgsm", eps=0.1, checks=False,
                            threat=("whitebox",), max_samples=6)
    assert set(rep.data["models"]["patched"]["threats"]) == {"whitebox"}


@pytest.mark.parametrize("kwargs,needle", [
    ({"bogus": 1}, "bogus"), ({"steps": "5"}, "steps"), ({"restarts": 0}, "restarts"), ({"eps": None}, "eps"),
    ({"n_classes": 2.0}, "n_classes"), ({"seed": float("nan")}, "seed"), ({"settings": {}}, "settings"),
    ({"queries": 2 ** 70}, "queries"),
])
def test_attacks_get_arguments(kwargs, needle):
    with pytest.raises(HardenError, match=needle):
        hardener.attacks.get("apgd-ce", **kwargs)
    with pytest.raises(InputError, match="name"):
        hardener.attacks.get(None)


def test_valid_arguments_still_work(patched_ckpt):
    assert hardener.attacks.get("apgd-ce", eps=0.1, steps=5, n_classes=3, restarts=2).spec.restarts == 2
    assert hardener.load(str(patched_ckpt), arch=ARCH, arch_kwargs={}) is not None


def test_flags_become_keywords_in_the_library_words():
    """Issue 31, item 1: messages are written once in the command line's words; the library translates the flags its
    keywords answer to (`python_words`), and only those."""
    from hardener.options.wording import python_words

    kw = {"device": "auto", "at": None, "epochs": 10, "batch_size": 128, "trust_arch": False, "augment": True,
          "eps": "8/255"}
    assert python_words("--device cuda: none here (use --device cpu or auto)", kw) == \
        "device='cuda': none here (use device='cpu' or auto)"
    assert python_words("--at 'nope' matches no layer", kw) == "at='nope' matches no layer"
    assert python_words("raise --epochs (or lower --batch-size)", kw) == "raise epochs (or lower batch_size)"
    assert python_words("--eps 8/255 and --epochs 3", kw) == "eps=8/255 and epochs=3"
    assert python_words("use --trust-arch, or --no-augment", kw) == "use trust_arch=True, or augment=False"
    assert python_words("--out x.pt exists; rerun with --resume", kw) == "--out x.pt exists; rerun with --resume"
    assert python_words("unknown --attack 'x'", {"attacks": "apgd"}, {"attack": "attacks"}) == "unknown attacks='x'"


def test_library_errors_name_keywords_and_the_command_line_names_flags(toy, tiny_ckpt, tiny_data, tmp_path, runner):
    """The same error, raised in the library: keywords from `hardener.patch`, `.evaluate` and `.load`; flags from
    `harden patch` (the command line's words are the messages' own)."""
    from hardener.cli.app import main

    with pytest.raises(InputError) as e:
        hardener.patch(trained_tiny(steps=1), toy, recipe=None, at="nope", progress=False)
    assert "at='nope' matches no layer" in str(e.value) and "--at" not in str(e.value)
    with pytest.raises(InputError) as e:
        hardener.patch(trained_tiny(steps=1), toy, recipe=None, method="bogus", progress=False)
    assert "unknown method='bogus'" in str(e.value) and "--method" not in str(e.value)
    with pytest.raises(InputError) as e:
        hardener.evaluate(trained_tiny(steps=1), toy, eps=0.1, device="no-such-device", progress=False)
    assert "--" not in str(e.value) and "device" in str(e.value)
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(HardenError) as e:
        hardener.load(bad, arch=ARCH)
    assert "--arch" not in str(e.value)
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "nope",
                             "--out", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 2 and "--at 'nope' matches no layer" in r.output, r.output


def test_a_module_argument_that_is_no_module_is_an_input_error(toy, patched_ckpt):
    with pytest.raises(InputError, match="^model must be the base nn.Module you built, got str"):
        hardener.load(patched_ckpt, model="resnet")
    with pytest.raises(InputError, match="^surrogate must be an nn.Module"):
        hardener.evaluate(trained_tiny(steps=1), toy, eps=0.1, surrogate="resnet", progress=False)


def test_a_word_after_a_flag_is_its_value_only_where_the_phrase_ends():
    from hardener.options.wording import python_words

    kw = {"loss": "fixer", "eps": "8/255", "method": "fixer"}
    assert python_words("(--loss rslad: soft labels)", kw) == "(loss='rslad': soft labels)"
    assert python_words("(--method fixer,auxbn)", kw) == "(method='fixer,auxbn')"
    assert python_words("--eps must be below 1", kw) == "eps must be below 1"  # prose, not a value


def test_mean_and_std_of_the_wrong_length_are_named_not_blamed_on_the_images(toy, tiny_ckpt, tiny_data, runner):
    """Three mean values on 1-channel images used to broadcast them to 3 channels, and the model's channel error then
    said "the images have 1 channels but the model takes 1"."""
    from hardener.cli.app import main

    with pytest.raises(InputError, match=r"^mean has 3 values but the images have 1 channel: give one value, or one "
                                         r"per channel \(1\)$"):
        hardener.evaluate(trained_tiny(steps=1), toy, eps=0.1, mean=[0.1, 0.2, 0.3], std=[0.3], progress=False)
    r = runner.invoke(main, ["eval", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--std", "0.2,0.3",
                             "--eps", "0.1", "--attack", "fgsm"])
    assert r.exit_code == 2 and "--std has 2 values but the images have 1 channel" in r.output, r.output


def test_a_normalisation_that_counts_the_models_channels_blames_the_images():
    """A model of 3 channels with a 3-value normalisation, fed grayscale images: the images are what is wrong."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3))
    gray = (torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(InputError, match=r"^the images have 1 channel but the model takes 3 \(its normalisation has 3 "
                                         r"values\): give images of shape \(3, 8, 8\)$"):
        hardener.evaluate(net, gray, eps=0.1, mean=[0.5] * 3, std=[0.2] * 3, progress=False)
