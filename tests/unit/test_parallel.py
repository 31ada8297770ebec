"""The parallel room on two real gloo ranks (the session's `gloo_world`): joining a group that
exists, DDP, SyncBN and the per-step flags, each checked against one process doing the same
work on the whole batch.

The `_on_rank` functions run inside the ranks (module level: they travel by name); the single-
process references run here, in the test process, where no process group exists.
"""
from __future__ import annotations

import torch
from torch import nn

from distributed_step.config import TrainConfig
from distributed_step.optim import sgd
from distributed_step.parallel.ddp import wrap
from distributed_step.parallel.process_group import DistEnv, detect, setup, teardown
from distributed_step.parallel.rank0_statistics import Rank0Statistics
from distributed_step.parallel.step_flags import StepFlags
from distributed_step.parallel.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm
from distributed_step.step import train_step

STEPS, BATCH = 3, 8  # global batch; rank r trains on its half


def _env() -> DistEnv:
    """A rank's DistEnv as train() gets it: setup() adopts the group the world made."""
    return setup(detect(torch.device("cpu")))


def _net(seed: int, batchnorm: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norm = [nn.BatchNorm2d(4)] if batchnorm else []
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *norm, nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 3, 8, 8, generator=gen), torch.randint(5, (STEPS, BATCH), generator=gen)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


# --- joining the group ---------------------------------------------------------------------------

def _setup_on_rank():
    import torch.distributed as dist

    env = _env()
    teardown(env)  # setup() did not create the group, so teardown() must leave it alone
    return env, dist.is_initialized()


def test_setup_adopts_the_group_that_exists_and_teardown_leaves_it(gloo_world):
    for rank, (env, still_initialized) in enumerate(gloo_world.run(_setup_on_rank)):
        assert (env.rank, env.world_size, env.backend, env.owns_group) == (rank, 2, "gloo", False)
        assert env.distributed and env.is_main == (rank == 0)
        assert still_initialized


# --- DDP -----------------------------------------------------------------------------------------

def _ddp_on_rank(batchnorm: bool) -> dict:
    env = _env()
    # Rank 1 starts from other weights: DDP must give every rank rank 0's before the first step.
    net = _net(seed=env.rank, batchnorm=batchnorm)
    if batchnorm:
        net = convert_sync_batchnorm(net, env.device, env.backend)
    model = wrap(net, env, TrainConfig())  # the default knobs: static graph, bucket view, no hook
    optimizer = _optimizer(model)
    images, labels = _batches()
    mine = slice(env.rank * BATCH // 2, (env.rank + 1) * BATCH // 2)
    losses = [train_step(model, optimizer, images[s, mine], labels[s, mine], nn.CrossEntropyLoss()).item()
              for s in range(STEPS)]
    return {"wrapper": type(model).__name__, "hook": model.comm_hook, "losses": losses,
            "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def _one_process(batchnorm: bool) -> tuple[list[float], dict]:
    """The same steps on one process with the whole batch, torch's own BatchNorm included."""
    net = _net(seed=0, batchnorm=batchnorm)
    optimizer = _optimizer(net)
    images, labels = _batches()
    losses = [train_step(net, optimizer, images[s], labels[s], nn.CrossEntropyLoss()).item() for s in range(STEPS)]
    return losses, net.state_dict()


def _check_ddp(results: list[dict], batchnorm: bool) -> None:
    ref_losses, ref_state = _one_process(batchnorm)
    first = _net(seed=0, batchnorm=batchnorm).state_dict()
    assert [r["wrapper"] for r in results] == ["DistributedDataParallel"] * 2
    assert [r["hook"] for r in results] == ["none"] * 2
    for name, value in results[0]["state"].items():
        # The ranks all-reduced the same gradients and applied the same update: bit-identical.
        assert torch.equal(value, results[1]["state"][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(value, ref_state[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    moved = max((results[0]["state"][k] - v).abs().max().item() for k, v in first.items() if v.is_floating_point())
    assert moved > 1e-2  # the steps changed the weights, so equality above says something
    # Each rank's loss is the mean over its half; their mean is the whole batch's loss.
    mean_losses = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)


def test_ddp_on_two_halves_equals_one_process_on_the_whole_batch(gloo_world):
    """No BatchNorm here: with plain BatchNorm each rank normalises by its own half's statistics,
    which differ from the whole batch's by design (the SyncBN case is the next test)."""
    _check_ddp(gloo_world.run(_ddp_on_rank, False), batchnorm=False)


def test_ddp_with_sync_bn_equals_one_process_with_torch_batchnorm(gloo_world):
    """--sync-bn as train() builds it: GlooSyncBatchNorm inside DDP. Weights and running
    statistics after 3 steps equal torch's BatchNorm2d trained on the whole batch."""
    _check_ddp(gloo_world.run(_ddp_on_rank, True), batchnorm=True)


# --- SyncBN alone --------------------------------------------------------------------------------

def _bn_net() -> nn.Module:
    """Two BatchNorms, one nested and one with a cumulative average (momentum=None), whose
    affine parameters and running statistics are not the defaults (so conversion must copy them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Sequential(nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3, momentum=None)))
        for bn in (net[1], net[3][1]):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return net


def _bn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, BATCH, 3, 9, 9, generator=gen) * 3 + 1  # 2 steps; off-centre, wide
    return x, torch.randn(2, BATCH, 3, 5, 5, generator=gen)  # weights of the loss: every output counts


SPLIT = 3  # rank 0 takes 3 samples, rank 1 the other 5: the statistics weigh each sample, not each rank


def _syncbn_on_rank() -> dict:
    env = _env()
    net = convert_sync_batchnorm(_bn_net(), env.device, env.backend)
    x_all, w_all = _bn_inputs()
    mine = slice(0, SPLIT) if env.rank == 0 else slice(SPLIT, BATCH)
    outs, input_grads = [], []
    for step in range(2):
        x = x_all[step, mine].clone().requires_grad_()
        out = net(x)
        (out * w_all[step, mine]).sum().backward()  # the sum over ranks is the whole batch's loss
        outs.append(out.detach())
        input_grads.append(x.grad)
    net.eval()
    return {"types": [type(m).__name__ for m in net.modules() if isinstance(m, nn.BatchNorm2d)],
            "outs": outs, "input_grads": input_grads, "eval_out": net(x_all[0, mine]).detach(),
            "grads": {n: p.grad for n, p in net.named_parameters()},
            "buffers": {n: b.clone() for n, b in net.named_buffers()}}


def test_sync_bn_on_two_ranks_equals_torch_batchnorm_on_the_whole_batch(gloo_world):
    ranks = gloo_world.run(_syncbn_on_rank)
    assert [r["types"] for r in ranks] == [["GlooSyncBatchNorm"] * 2] * 2  # the nested one too

    net = _bn_net()  # the reference: torch's BatchNorm2d on one process, whole batches
    x_all, w_all = _bn_inputs()
    for step in range(2):
        x = x_all[step].clone().requires_grad_()
        out = net(x)
        (out * w_all[step]).sum().backward()
        close = {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(torch.cat([r["outs"][step] for r in ranks]), out.detach(), **close)
        torch.testing.assert_close(torch.cat([r["input_grads"][step] for r in ranks]), x.grad, **close)
    for name, param in net.named_parameters():  # each rank holds its samples' share of the gradient
        torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], param.grad,
                                   rtol=1e-5, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for name, buf in net.named_buffers():  # running mean and (unbiased) variance, batches counted
        for rank in ranks:
            torch.testing.assert_close(rank["buffers"][name], buf, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
    assert int(net[3][1].num_batches_tracked) == 2
    net.eval()  # evaluation uses those statistics and no collective
    torch.testing.assert_close(torch.cat([r["eval_out"] for r in ranks]), net(x_all[0]).detach(),
                               rtol=1e-5, atol=1e-5)


def test_sync_bn_on_one_process_matches_torch_and_keeps_the_state():
    """Without a group the same two-pass arithmetic runs without collectives; conversion keeps
    the affine parameters and running statistics, and leaves a converted module alone."""
    reference, synced = _bn_net(), convert_sync_batchnorm(_bn_net(), torch.device("cpu"), "gloo")
    assert isinstance(synced[1], GlooSyncBatchNorm) and isinstance(synced[3][1], GlooSyncBatchNorm)
    for name, value in reference.state_dict().items():
        assert torch.equal(synced.state_dict()[name], value), name
    assert convert_sync_batchnorm(synced, torch.device("cpu"), "gloo")[1] is synced[1]
    x = _bn_inputs()[0][0]
    torch.testing.assert_close(synced(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(synced[3][1].running_var, reference[3][1].running_var, rtol=1e-5, atol=1e-6)


# --- the per-step flags --------------------------------------------------------------------------

def _flags_on_rank(stop_at: dict[int, int], bad_loss_at: dict[int, list[int]], steps: int) -> list:
    """Post `steps` steps; rank r asks to stop at stop_at[r] and has a non-finite loss at the
    steps in bad_loss_at[r]. Returns (stop, non_finite_step) after each post, then after settle()."""
    env = _env()
    flags, seen = StepFlags(env), []
    for step in range(steps):
        bad = step in bad_loss_at.get(env.rank, [])
        loss = torch.tensor(float("nan") if bad and step % 2 == 0 else float("inf") if bad else 1.5)
        flags.post(step, stop_requested=stop_at.get(env.rank) == step, loss=loss)
        seen.append((flags.stop, flags.non_finite_step))
    flags.settle()
    seen.append((flags.stop, flags.non_finite_step))
    return seen


def test_a_stop_asked_on_one_rank_is_seen_by_every_rank_one_step_late(gloo_world):
    ranks = gloo_world.run(_flags_on_rank, {1: 1}, {}, 4)
    # Step 1's flags are read when step 2 is posted: not before, on either rank (rank 1 included).
    expected = [(False, None), (False, None), (True, None), (True, None), (True, None)]
    assert ranks == [expected, expected]


def test_settle_reads_the_last_step_at_once(gloo_world):
    ranks = gloo_world.run(_flags_on_rank, {0: 2}, {}, 3)
    assert ranks == [[(False, None)] * 3 + [(True, None)]] * 2


def test_the_first_non_finite_step_is_named_on_every_rank(gloo_world):
    # NaN on rank 1 at step 2, inf on rank 0 at step 3: every rank names step 2, and keeps it.
    ranks = gloo_world.run(_flags_on_rank, {}, {1: [2], 0: [3]}, 5)
    expected = [(False, None)] * 3 + [(False, 2)] * 3
    assert ranks == [expected, expected]


# --- rank 0's running statistics, sent after each forward ---------------------------------------

def _rank0_statistics_on_rank() -> list:
    """A BatchNorm that sees different batches on each rank, under DDP: after each step's forward
    every rank holds rank 0's running statistics of that step; no_sync micro-steps send nothing."""
    env = _env()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model = torch.nn.parallel.DistributedDataParallel(net)
    buffers = [b for b in net.buffers() if b.is_floating_point()]
    statistics, step = Rank0Statistics(env, buffers), [0]
    statistics.attach(model, lambda: step[0])
    seen = []
    for step[0] in (1, 2):
        with model.no_sync():
            model(torch.randn(8, 4) * (env.rank + 1)).sum().backward()  # an accumulation micro-step
        assert step[0] not in statistics.sent
        model(torch.randn(8, 4) * (env.rank + 1) + 1e-3).sum().backward()
        seen.append((statistics.of_step(step[0]), torch.cat([b.reshape(-1) for b in buffers])))
    assert statistics.of_step(7) is None  # never sent
    return seen


class _SlowWork:
    """An all-reduce that completes on its third look."""
    def __init__(self):
        self.looks = 0

    def is_completed(self) -> bool:
        self.looks += 1
        return self.looks >= 3


def test_detaching_waits_for_the_reductions_in_flight_then_drops_them():
    statistics = Rank0Statistics(DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo", False), [])
    works = [_SlowWork(), _SlowWork()]
    statistics.sent = {4: (works[0], None), 5: (works[1], None)}
    statistics.detach()
    assert statistics.sent == {} and [w.looks for w in works] == [3, 3]


def test_every_rank_gets_rank_0s_running_statistics_of_each_step_bit_for_bit(gloo_world):
    rank0, rank1 = gloo_world.run(_rank0_statistics_on_rank)
    for (zero_got, zero_own), (one_got, one_own) in zip(rank0, rank1):
        assert torch.equal(zero_got, zero_own) and torch.equal(one_got, zero_own)
        assert not torch.equal(one_own, zero_own)  # the ranks' own statistics differ


def test_step_flags_on_one_process_need_no_group():
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo", False)
    flags = StepFlags(env)
    flags.post(0, stop_requested=False, loss=torch.tensor(1.0))
    flags.post(1, stop_requested=True, loss=torch.tensor(float("inf")))
    assert (flags.stop, flags.non_finite_step) == (False, None)
    flags.settle()
    assert (flags.stop, flags.non_finite_step) == (True, 1)
