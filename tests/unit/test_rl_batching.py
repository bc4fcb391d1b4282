"""How a step's experience is dealt to a role group's ranks and put back together (rlhf.rl.batching), the seeds of
each purpose (rlhf.seeds), and the typed role groups' refusal of a group of another worker class."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf import seeds
from rlhf.rl.batching import UpdateSchedule, combine, gather, mini_batches, shard
from rlhf.rl.experience import sequence_batch


def experience(rows: int = 8):
    """``rows`` sequences whose first token is the row's number, so dealt rows can be told apart."""
    return sequence_batch([[100 + i] for i in range(rows)], [[7] * (1 + i % 3) for i in range(rows)], 0)


def first_tokens(micro_batches) -> list[int]:
    return [int(row[0]) - 100 for batch in micro_batches for row in batch.input_ids]


def test_each_epoch_deals_every_row_once_over_the_ranks_with_the_global_denominators() -> None:
    batch = experience(8)
    per_rank, denominators = mini_batches(batch, ranks=2, micro_batch_size=1, schedule=UpdateSchedule(2, 2, 5), step=3)
    assert len(per_rank) == 2 and all(len(rank) == 4 for rank in per_rank)  # 2 epochs x 2 mini-batches each
    for epoch in range(2):
        dealt = [row for rank in per_rank for mini in rank[2 * epoch : 2 * epoch + 2] for row in first_tokens(mini)]
        assert sorted(dealt) == list(range(8))
    # a mini-batch's denominators are the whole mini-batch's (both ranks' rows), so the ranks' losses add up to it
    for index, denominator in enumerate(denominators):
        rows = [row for rank in per_rank for row in first_tokens(rank[index])]
        assert denominator["num_sequences"] == len(rows) == 4
        assert denominator["num_tokens"] == sum(1 + row % 3 for row in rows)


def test_the_shuffle_is_seeded_by_the_run_seed_the_step_and_the_epoch() -> None:
    batch = experience(8)

    def order(seed: int, step: int) -> list[int]:
        per_rank, _ = mini_batches(batch, 1, 8, UpdateSchedule(2, 2, seed), step)
        return [row for mini in per_rank[0] for row in first_tokens(mini)]

    assert order(5, 3) == order(5, 3)
    assert order(5, 3) != order(5, 4) and order(5, 3) != order(6, 3)
    first_epoch, second_epoch = order(5, 3)[:8], order(5, 3)[8:]
    assert first_epoch != second_epoch
    # one optimizer step over the batch (one epoch, one mini-batch): nothing to order, the rows stay as generated
    per_rank, _ = mini_batches(batch, 1, 8, UpdateSchedule(1, 1, 5), 3)
    assert first_tokens(per_rank[0][0]) == list(range(8))


def test_a_sharded_pass_gathers_back_into_the_rows_in_order_zero_padded() -> None:
    batch = experience(5)
    shards, slices = shard(batch, ranks=2, micro_batch_size=2)
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 5)]
    widths = {}
    answers = []  # what each rank answers: per micro-batch, [b, t] with t its own trimmed width; here row + 1
    for rank in shards:
        answers.append([])
        for micro in rank:
            rows = [row for row in first_tokens([micro])]
            widths |= {row: micro.response_mask.shape[1] for row in rows}
            answers[-1].append(
                torch.tensor(rows, dtype=torch.float32)[:, None].expand(-1, micro.response_mask.shape[1]) + 1
            )
    out = gather(answers, width=batch.response_mask.shape[1])
    assert out.shape == batch.response_mask.shape
    for row in range(5):
        assert torch.all(out[row, : widths[row]] == row + 1) and torch.all(out[row, widths[row] :] == 0)
    assert min(widths.values()) < batch.response_mask.shape[1]  # some micro-batch was trimmed: the padding is tested


def test_rank_metrics_combine_token_weighted_losses_summed_and_the_engine_stats_of_rank_0() -> None:
    per_rank = [
        {"tokens": 10.0, "clip_fraction": 1.0, "policy_loss": 0.5, "grad_norm": 2.0},
        {"tokens": 30.0, "clip_fraction": 9.0, "policy_loss": 0.25, "grad_norm": 2.0},
    ]
    combined = combine(per_rank, extensive=("policy_loss",))
    assert combined == {"clip_fraction": (1.0 + 9.0) / 40.0, "policy_loss": 0.75, "grad_norm": 2.0}


def test_the_update_phase_times_of_the_ranks_combine_as_the_slowest_rank() -> None:
    """The ranks run their update at the same time, so a phase takes as long as its slowest rank: neither a sum
    over ranks nor a token-weighted mean."""
    per_rank = [
        {"tokens": 10.0, "time/policy_forward": 1.5, "time/policy_backward": 3.0},
        {"tokens": 30.0, "time/policy_forward": 2.0, "time/policy_backward": 2.5},
    ]
    combined = combine(per_rank, extensive=())
    assert combined == {"time/policy_forward": 2.0, "time/policy_backward": 3.0}


def test_each_purpose_draws_its_own_stream_from_the_seeds_it_always_drew() -> None:
    """The seeds moved into rlhf.seeds unchanged (a resumed run of an earlier version draws the same streams)."""
    assert seeds.position(7, 2) == 7 * 1_000_003 + 2
    assert seeds.generation(7, 3) == 7 * 1_000_000 + 3 * 10_007
    assert seeds.mini_batch_order(7, 3, 1) == 7 * 1_000_003 + 3 * 101 + 1
    assert seeds.held_out(7) == 7 + 1_000_003
    assert (seeds.worker(7, "policy", 1), seeds.worker(7, "value", 1)) == (8, 1008)
    assert len({seeds.generation(7, 3), seeds.mini_batch_order(7, 3, 0), seeds.position(7, 3)}) == 3


def test_a_role_group_refuses_an_actor_group_of_another_worker_class() -> None:
    from rlhf.rl.roles import PolicyGroup, ReferenceGroup
    from rlhf.rl.workers import PolicyWorker

    policy_actors = SimpleNamespace(worker_cls=PolicyWorker, role="policy", world_size=1)
    assert PolicyGroup(policy_actors, micro_batch_size=2).role == "policy"  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ReferenceGroup needs a group of ReferenceWorker"):
        ReferenceGroup(policy_actors)  # type: ignore[arg-type]
