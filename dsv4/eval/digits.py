"""The judge of generated digits (issue 22): a small CNN trained only on real MNIST-5k digits (the training split of
`dsv4.data.digits.split`), which reads a generated 32 x 32 image and names its digit. Its accuracy on the held-out
real digits is reported beside its verdicts on generated ones, so a verdict can be read against what the judge
itself gets right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.data.digits import digit_image, load_mnist, split


class DigitClassifier(nn.Module):
    """[N, 32, 32] grey in [0, 1] -> logits [N, 10]: two conv-conv-pool stages and a linear head."""

    def __init__(self, width: int = 32):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(1, width), stage(width, 2 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x[:, None]))


def as_grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] (a generated or framed digit) or [N, 28, 28] (MNIST) -> float [N, 32, 32] in [0, 1]."""
    if images.dim() == 3 and images.shape[-1] == 28:
        images = torch.stack([digit_image(im) for im in images])
    if images.dim() == 4:
        images = images.float().mean(-1)
    return images.float() / 255


def jitter(x: torch.Tensor, g: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Each image shifted by up to `pixels` in each direction (zeros fill in): generated digits are not centred
    exactly as MNIST's are."""
    out = torch.zeros_like(x)
    shifts = torch.randint(-pixels, pixels + 1, (x.shape[0], 2), generator=g).tolist()
    for i, (dy, dx) in enumerate(shifts):
        out[i] = torch.roll(x[i], (dy, dx), (0, 1))
    return out


def train_classifier(steps: int = 600, batch: int = 64, seed: int = 0) -> tuple[DigitClassifier, float]:
    """A classifier trained on the real training digits -> (classifier in eval mode, accuracy on the held-out real
    digits)."""
    images, labels = load_mnist()
    train, val = split(labels)
    x, y = as_grey(images[train]), labels[train]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(jitter(x[pick], g)), y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, accuracy(model, images[val], labels[val])


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (as `as_grey` takes them) -> the digit each shows [N]."""
    return torch.cat([model(as_grey(chunk)).argmax(-1) for chunk in images.split(512)])


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (classify(model, images) == labels).float().mean().item()
