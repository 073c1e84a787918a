"""The network's flatten order and memory formats, the training step, Lightning's loop."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from cnnstudy.config.compose import compose
from cnnstudy.network.modules import FlattenHWC, build_network
from cnnstudy.network.plan import plan
from cnnstudy.run.classifier import Classifier, Totals, classify


def test_flatten_reads_height_width_channel_and_is_a_view_of_channels_last_maps():
    maps = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # N, C, H, W
    flat = FlattenHWC()(maps)
    assert flat.shape == (2, 60)
    # feature k is (h, w, c) with k = (h * W + w) * C + c, as describe's HxWxC shapes read
    h, w, c = 2, 3, 1
    assert flat[1, (h * 5 + w) * 3 + c] == maps[1, c, h, w]
    nhwc = maps.contiguous(memory_format=torch.channels_last)
    assert FlattenHWC()(nhwc).data_ptr() == nhwc.data_ptr()  # no copy
    assert torch.equal(FlattenHWC()(nhwc), flat)


def test_network_computes_the_same_function_in_either_memory_format():
    cfg = compose([])
    torch.manual_seed(0)
    net = build_network(plan(cfg.model, cfg.data))
    x = torch.randn(4, 1, 32, 32)
    expected = net(x)
    nhwc = net.to(memory_format=torch.channels_last)
    got = nhwc(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected)


def test_totals_sum_loss_and_correct_counts_over_batches():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4)
    batches = [(torch.randn(5, 3), torch.randint(0, 4, (5,))) for _ in range(3)]
    totals = Totals()
    losses = [classify(net, batch, totals).item() for batch in batches]
    loss_sum, correct, count = totals.as_tensor().tolist()
    assert count == totals.count == 15
    assert loss_sum == pytest.approx(sum(loss * 5 for loss in losses))
    with torch.no_grad():
        assert correct == sum(int((net(x).argmax(1) == y).sum()) for x, y in batches)


class _Batches:
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = [
            (torch.randn(8, 3, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)")
def test_lightning_fit_matches_a_plain_loop_step_for_step():
    """Manual optimization: zero_grad, backward, optimizer step, scheduler step per batch,
    the same numbers as the plain loop the benchmarks compare against."""

    def optimizer(params):
        return torch.optim.Adam(params, lr=0.01)

    def scheduler(opt, total_steps):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=total_steps)

    batches = _Batches(6)
    torch.manual_seed(1)
    plain_net = torch.nn.Linear(3, 4)
    torch.manual_seed(1)
    system = Classifier(torch.nn.Linear(3, 4), 4, optimizer, scheduler)

    opt = optimizer(plain_net.parameters())
    sched = scheduler(opt, 12)
    for _ in range(2):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(plain_net(x), y).backward()
            opt.step()
            sched.step()

    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(system, train_dataloaders=batches)
    assert system.lr_schedulers().last_epoch == 12  # stepped once per batch
    for got, want in zip(system.network.parameters(), plain_net.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the last epoch's accuracy, counted by hand over the same batches and weights: each
    # batch was scored by the network as it was before that batch's step
    torch.manual_seed(1)
    replay = torch.nn.Linear(3, 4)
    replay_opt = optimizer(replay.parameters())
    replay_sched = scheduler(replay_opt, 12)
    correct = 0
    for epoch in range(2):
        for x, y in batches:
            with torch.no_grad():
                hits = int((replay(x).argmax(1) == y).sum())
            correct += hits if epoch == 1 else 0
            replay_opt.zero_grad()
            F.cross_entropy(replay(x), y).backward()
            replay_opt.step()
            replay_sched.step()
    assert trainer.callback_metrics["train/acc"].item() == pytest.approx(correct / 48)
