"""Training the digits models: the ``unet-digits`` eps-predictor and the FD-digits classifier.

Both train on the same fixed split of scikit-learn's 8x8 digits (``digits_split``); the test split is
held out for evaluation (FD-digits reference, classifier accuracy, held-out denoising loss).
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..evaluation.features import DigitsClassifier
from ..util.runtime import resolve_device
from ..core.schedule import DDPM_SCHEDULE
from ..models.testbeds import load_digits_data

#: Fraction of the digits held out, and the seed of the (stratified) split.
TEST_FRACTION, SPLIT_SEED = 0.2, 0

#: The unet-digits architecture: a two-level convolutional UNet (8x8 -> 4x4), no attention.
UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, add_attention=False,
)


class DigitsSplit(NamedTuple):
    x_train: torch.Tensor  # (N, 1, 8, 8) float32 in [-1, 1]
    y_train: torch.Tensor  # (N,) int64 labels
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_split() -> DigitsSplit:
    """The fixed train/test split (80/20, stratified by label, seed 0) that every user of dode shares."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x = torch.from_numpy(load_digits_data()).float()
    y = torch.from_numpy(load_digits().target).long()
    train, test = train_test_split(np.arange(len(x)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                   stratify=y.numpy())
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return DigitsSplit(x[train], y[train], x[test], y[test])


def make_unet():
    """A freshly initialised unet-digits UNet2DModel (``UNET_CONFIG``)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def alphas_cumprod(scheduler_config: dict = DDPM_SCHEDULE) -> torch.Tensor:
    """abar_t at every training timestep, float32."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config).alphas_cumprod.float()


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = abar.to(x0.device)[t].reshape(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (a multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def _update_ema(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_unet(steps: int = 4000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device="auto",
               ema_decay: float = 0.999, progress: bool = True):
    """Train unet-digits on the train split with the DDPM eps-loss; returns (EMA UNet, loss per step).

    Timesteps are uniform over the 1000 training steps, the learning rate warms up for 2 % of the steps
    and then decays on a cosine; the EMA decay ramps up as min(ema_decay, (1 + k) / (10 + k)).
    """
    device = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = digits_split().x_train
    abar = alphas_cumprod()
    unet = make_unet().to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _cosine_lr(k, steps, max(1, steps // 50)))
    losses = []
    bar = tqdm(range(steps), desc="training unet-digits", disable=not progress)
    for k in bar:
        x0 = data[torch.randint(len(data), (batch_size,), generator=gen)]
        t = torch.randint(len(abar), (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        loss = F.mse_loss(unet(noised(x0, t, noise, abar), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _update_ema(ema, unet, min(ema_decay, (1 + k) / (10 + k)))
        losses.append(loss.item())
        if k % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    return ema.cpu(), losses


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate every image by up to ``max_shift`` pixels, filling with the background value -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(2 * max_shift + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, device="auto",
                     progress: bool = True):
    """Train the FD-digits classifier on the train split (random 1-pixel shifts); returns (model, losses)."""
    device = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    split = digits_split()
    model = DigitsClassifier().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    batches = math.ceil(len(split.x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * batches)
    losses = []
    for _ in tqdm(range(epochs), desc="training digits classifier", disable=not progress):
        order = torch.randperm(len(split.x_train), generator=gen)
        for idx in order.split(batch_size):
            x, y = _shift(split.x_train[idx], gen).to(device), split.y_train[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return model.cpu().eval(), losses
