import random

import pytest

from genflow.data.split import split_ids, train_count, validation_count

CELEBA_IDS = [f"{i:06d}" for i in range(1, 202_599 + 1)]


def test_celeba_counts_are_floor_of_fraction():
    train, test = split_ids(CELEBA_IDS, 0.7, seed=0)
    assert (len(train), len(test)) == (141_819, 60_780)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(CELEBA_IDS)


def test_independent_of_input_order():
    ids = CELEBA_IDS[:5000]
    shuffled = random.Random(1).sample(ids, len(ids))
    assert split_ids(ids, 0.7, seed=5) == split_ids(shuffled, 0.7, seed=5)


def test_seed_changes_the_split_and_order_is_not_id_order():
    ids = CELEBA_IDS[:1000]
    train0, _ = split_ids(ids, 0.7, seed=0)
    train1, _ = split_ids(ids, 0.7, seed=1)
    assert set(train0) != set(train1)
    assert train0 != sorted(train0)  # shards are written in this order: it must mix the ids


def test_dropping_one_id_moves_at_most_one_other_across():
    ids = CELEBA_IDS[:2000]
    train, test = split_ids(ids, 0.7, seed=0)
    dropped = test[10]
    train_after, test_after = split_ids([i for i in ids if i != dropped], 0.7, seed=0)
    moved = set(train) ^ set(train_after)
    assert len(moved) <= 1
    assert len(set(test) - {dropped} - set(test_after)) <= 1


def test_duplicate_ids_are_an_error():
    with pytest.raises(ValueError, match="not unique"):
        split_ids(["000001", "000001", "000002"], 0.7, seed=0)


def test_train_count_uses_integer_arithmetic():
    # int(0.7 * 90) is 62 in floating point; 7/10 of 90 is 63.
    train, test = split_ids(CELEBA_IDS[:90], 0.7, seed=0)
    assert (len(train), len(test)) == (63, 27)
    assert [train_count(n, 0.7) for n in (10, 90, 170, 202_599)] == [7, 63, 119, 141_819]


def test_validation_is_a_tenth_of_train_up_to_5000():
    assert [validation_count(n) for n in (9, 70, 1400, 141_819)] == [0, 7, 140, 5000]
