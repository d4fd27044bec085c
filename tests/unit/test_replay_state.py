"""ReplayState, the host side of a replayed decode graph, on the CPU: the steady state stages nothing
and runs no full check, jumps stage the lengths through a ring of two buffers (waiting only on the
buffer's own previous copy), and the cache checks still refuse what the layers' per-step checks refuse
(capacity, a freed slot, a past beyond what was written), with their messages."""

from __future__ import annotations

import numpy as np
import pytest

from tp_runtime.batch.kv_cache import CacheCapacityError, CacheStateError, KVCache, PagedKVCache
from tp_runtime.batch.replay_state import ReplayState
from tp_runtime.batch.step import Step
from tp_runtime.config import AttentionConfig
from tp_runtime.sharding import head_layout

CFG = AttentionConfig(hidden_size=16, num_heads=2)
LAYOUT = head_layout(2, 2, 1, 0)


def contiguous(max_len: int = 12, batch: int = 4) -> KVCache:
    return KVCache(config=CFG, head_layout=LAYOUT, num_layers=1, max_batch=batch, max_seq_len=max_len)


def paged() -> PagedKVCache:
    return PagedKVCache(
        config=CFG, head_layout=LAYOUT, num_layers=1, num_blocks=8, block_size=4, max_seqs=4, max_blocks_per_seq=4
    )


class CountingEvent:
    def __init__(self):
        self.waits = 0

    def synchronize(self):
        self.waits += 1


def captured(cache, slots, past) -> ReplayState:
    """A state as a graph leaves it after capture: the past written by the warm-up, lengths on the device."""
    cache.set_written(slots, past)
    state = ReplayState(cache, slots, pinned=False)
    state.reset(np.asarray(past, dtype=np.int64))
    return state


def test_steady_state_stages_nothing_and_checks_one_counter(monkeypatch):
    cache = contiguous()
    state = captured(cache, [0, 1, 2], [3, 5, 1])
    calls = []
    real = cache.capacities
    monkeypatch.setattr(cache, "capacities", lambda s: calls.append(1) or real(s))
    for i in range(4):
        given = None if i % 2 else state.past.copy()  # None, or the lengths the device already holds
        assert state.before(given) is None
        state.after()
    assert len(calls) == 1, "the full check runs once, then the headroom counter stands for it"
    assert state.past.tolist() == [7, 9, 5]
    assert cache.written[:3].tolist() == [7, 9, 5]  # what the four replays wrote


def test_jumps_stage_through_two_buffers_waiting_on_their_own_copy():
    cache = contiguous()
    state = captured(cache, [0, 1], [4, 4])
    events = []
    buffers = []
    for past in ([2, 3], [1, 1], [3, 2]):
        buf = state.before(past)
        assert buf is not None
        assert buf.numpy().tolist() == [past, past, [p + 1 for p in past]]  # past, position, total
        buffers.append(buf)
        events.append(CountingEvent())
        state.staged(events[-1])
        state.after()
    assert buffers[0] is buffers[2] and buffers[0] is not buffers[1]
    assert [e.waits for e in events] == [1, 0, 0], "only the third jump reuses a buffer, after its copy"
    assert state.before([4, 3]) is None  # one further than the last jump: nothing to stage


def test_capacity_is_refused_when_the_headroom_runs_out():
    cache = contiguous(max_len=6)
    state = captured(cache, [0, 1], [2, 4])
    for _ in range(2):  # slot 1: totals 5 and 6 fit
        state.before(None)
        state.after()
    with pytest.raises(CacheCapacityError, match="slot 1: needs 7 cached tokens"):
        state.before(None)
    assert cache.written[:2].tolist() == [4, 6]  # the refused step recorded nothing


def test_paged_capacity_follows_reserve():
    cache = paged()
    cache.reserve_slots([0, 1], [4, 4])
    state = captured(cache, [0, 1], [3, 3])
    state.before(None)
    state.after()
    with pytest.raises(CacheCapacityError, match="reserve"):
        state.before(None)  # totals 5 need a second block
    cache.reserve_slots([0, 1], [8, 8])  # a new epoch: the next replay checks again and fits
    state.before(None)
    state.after()
    assert cache.written[:2].tolist() == [5, 5]


def test_freed_slot_and_unwritten_past_are_refused():
    cache = contiguous()
    state = captured(cache, [2, 0], [3, 3])
    state.before(None)
    state.after()
    cache.free(0)
    with pytest.raises(CacheStateError, match="slot 0 was freed"):
        state.before(None)
    cache.reserve_slots([0], [8])
    with pytest.raises(CacheStateError, match="slot 0: the step says past_lens=4, the slot holds 0"):
        state.before(None)
    with pytest.raises(CacheStateError, match="past_lens=9"):
        state.before([9, 0 + 1])  # a jump beyond what slot 2 holds (4 written)


def test_a_refused_jump_is_staged_again_when_retried():
    cache = contiguous()
    state = captured(cache, [2, 0], [3, 3])
    with pytest.raises(CacheStateError, match="past_lens=9"):
        state.before([9, 1])  # slot 2 holds 4 written positions
    assert state.past.tolist() == [3, 3], "the host mirror moved although the jump never reached the device"
    cache.set_written([2], [9])
    assert state.before([9, 1]) is not None, "the retried jump must be staged for the device"
    assert state.past.tolist() == [9, 1]


def test_slots_out_of_order_record_their_writes():
    cache = contiguous()
    state = captured(cache, [3, 1], [2, 6])
    state.before(None)
    state.after()
    assert cache.written.tolist() == [0, 7, 0, 3]


@pytest.mark.parametrize("past", [[0, 3], [3], [[3, 3]]])
def test_bad_lengths_name_the_argument(past):
    state = captured(contiguous(), [0, 1], [3, 3])
    with pytest.raises(ValueError, match="past_lens: expected 2 lengths >= 1"):
        state.before(past)


def test_check_step_agrees_on_a_step_it_accepts():
    """The state's check is the cache's: a step it accepts passes ``check_step`` too."""
    cache = contiguous()
    state = captured(cache, [0, 1], [3, 5])
    state.before(None)
    cache.check_step(Step(new_lens=[1, 1], past_lens=[3, 5], slots=[0, 1]))


@pytest.mark.parametrize("make", [contiguous, paged])
def test_the_cache_epoch_moves_with_slot_state_not_with_steps(make):
    """A replay re-checks only when the epoch moves: reserve, free and set_written move it; a step's
    own writes (which only raise ``written``) do not."""
    cache = make()
    seen = [cache.epoch]
    for change in (lambda: cache.reserve_slots([0], [4]), lambda: cache.set_written([0], [2]), lambda: cache.free(0)):
        change()
        seen.append(cache.epoch)
    assert seen == sorted(set(seen)), f"every change moves the epoch forward: {seen}"
    cache.reserve_slots([1], [4])
    before = cache.epoch
    cache.check_step_once(Step(new_lens=[3], slots=[1]))
    assert cache.epoch == before and cache.written[1] == 3


def test_blocks_taken_back_behind_the_cache_s_back_are_seen():
    """Blocks freed through the allocator itself (not ``cache.free``) still move the epoch: the next
    replay re-checks and refuses the lost capacity."""
    cache = paged()
    cache.reserve_slots([0], [8])
    state = captured(cache, [0], [3])
    state.before(None)
    state.after()
    cache.allocator.free(0)
    with pytest.raises(CacheCapacityError, match="slot 0: needs 5 cached tokens, 0 reserved"):
        state.before(None)
