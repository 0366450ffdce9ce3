"""The ResNet classifier: channels, weights (null, local file, torchvision name offline),
and that it learns."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torchvision

from elinspect.losses import FocalLoss
from elinspect.models.classification import ImageClassifier
from elinspect.utils.weights import WeightsUnavailableError


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_for_any_input_channels(channels: int) -> None:
    net = ImageClassifier(num_classes=4, in_channels=channels)
    assert net(torch.rand(2, channels, 64, 64)).logits.shape == (2, 4)


def test_weights_from_a_local_file(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():
        source.layer3[0].conv1.weight.fill_(0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = ImageClassifier(num_classes=2, weights=str(path))
    assert torch.all(net.net.layer3[0].conv1.weight == 0.125)
    assert net.net.fc.out_features == 2  # the 1000-class head is not forced in


def test_grey_input_sums_the_pretrained_rgb_stem(tmp_path: Path) -> None:
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = ImageClassifier(num_classes=2, in_channels=1, weights=str(path))
    assert torch.allclose(net.net.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))


def test_torchvision_weights_without_network_fail_fast_and_say_where_to_put_them() -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"could not download .*copy that file to"):
        ImageClassifier(num_classes=2, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert time.monotonic() - start < 30


def test_unknown_weights_name_lists_the_valid_ones() -> None:
    with pytest.raises(WeightsUnavailableError, match="IMAGENET1K_V1"):
        ImageClassifier(num_classes=2, weights="NOPE")


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(WeightsUnavailableError, match="weights_only=True"):
        ImageClassifier(num_classes=2, weights=str(path))


@pytest.mark.parametrize("loss", [torch.nn.CrossEntropyLoss(), FocalLoss(gamma=2.0)])
def test_it_learns_a_separable_toy_problem(loss: torch.nn.Module) -> None:
    torch.manual_seed(0)
    images = torch.rand(16, 1, 32, 32) * 0.5
    labels = torch.arange(16) % 2
    images[labels == 1, :, 8:24, 8:24] += 0.5  # a bright square marks class 1
    net = ImageClassifier(num_classes=2, in_channels=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        value = loss(net(images).logits, labels)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    net.eval()
    accuracy = (net(images).logits.argmax(1) == labels).float().mean()
    assert losses[-1] < 0.3 * losses[0]
    assert accuracy == 1.0


def test_four_class_accuracy_is_the_share_of_cells_classified_right() -> None:
    """``acc`` means what a paper's accuracy means for every target: the share of right
    predictions. ELPV's four classes are far from balanced (1508 / 295 / 106 / 715), where the
    mean of per-class recalls (balanced accuracy) is another number; F1, precision, recall and
    AUROC stay macro averages."""
    from elinspect.models.classification.module import classification_metrics

    target = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2, 3, 3])
    predicted = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 3, 0])  # 7 of 10 right
    probs = torch.nn.functional.one_hot(predicted, 4).float() * 0.7 + 0.075
    metrics = classification_metrics(4)
    metrics.update(probs, target)
    values = metrics.compute()
    assert values["acc"].item() == pytest.approx(0.7)
    # per-class recalls 1, 0, 0, 0.5: the macro recall is not the accuracy
    assert values["recall"].item() == pytest.approx(0.375)
