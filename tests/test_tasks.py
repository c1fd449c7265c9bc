"""Built-in tasks: batch layout, seekability, answers that are right, metrics that can tell right from wrong."""
import re

import numpy as np
import pytest

from m1jax.tokenizer import ByteTokenizer
from m1jax.tasks import TASKS, arith_problem, get_task, score_arith

TASK_CONFIGS = [
    ("mqar", {}),
    ("mqar", {"num_pairs": 5, "num_queries": 3, "vocab": 40}),
    ("mqar", {"num_queries": 4}),
    ("copy", {}),
    ("copy", {"length": 7, "vocab": 11}),
    ("arith", {}),
    ("arith", {"digits": 3, "ops": "+-*"}),
    ("arith", {"digits": 1, "ops": ("*",)}),
]
SEQ_LENS = (37, 61)  # odd lengths, not multiples of anything


@pytest.mark.parametrize("name,options", TASK_CONFIGS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_layout_and_shifted_targets(name, options, seq_len, seed):
    task = get_task(name, **options)
    batch = task.batch(seed, 3, 4, seq_len)
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids"}
    for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                       ("segment_ids", np.int32)):
        assert batch[key].shape == (4, seq_len) and batch[key].dtype == dtype
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < task.vocab_size
    assert batch["targets"].max() < task.vocab_size
    assert set(np.unique(batch["segment_ids"])) <= {0, 1}
    real = batch["segment_ids"] == 1
    # Real tokens form a prefix of each row; padding holds the pad id and is never graded.
    assert np.all(np.diff(real.astype(int), axis=1) <= 0) and real[:, 0].all()
    assert np.all(batch["inputs"][~real] == task.pad_id)
    assert np.all(batch["loss_mask"][~real] == 0) and batch["loss_mask"].sum(axis=1).min() > 0


@pytest.mark.parametrize("name,options", TASK_CONFIGS[::2])
def test_batches_are_pure_functions_of_seed_step_and_row(name, options, seed):
    task = get_task(name, **options)
    first = task.batch(seed, 5, 3, 45)
    again = task.batch(seed, 5, 3, 45)
    wider = task.batch(seed, 5, 6, 45)  # row b does not depend on the batch size
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        np.testing.assert_array_equal(first[key], wider[key][:3])
    assert not np.array_equal(first["inputs"], task.batch(seed, 6, 3, 45)["inputs"])
    assert not np.array_equal(first["inputs"], task.batch(seed + 1, 5, 3, 45)["inputs"])


@pytest.mark.parametrize("name,options", TASK_CONFIGS)
def test_accuracy_is_one_on_targets_and_drops_on_a_corruption(name, options, seed, rng):
    task = get_task(name, **options)
    batch = task.batch(seed, 0, 3, 53)
    perfect = task.accuracy(batch["targets"], batch)
    assert perfect["accuracy"] == 1.0 and perfect["token_accuracy"] == 1.0
    graded = np.argwhere(batch["loss_mask"] > 0)
    b, t = graded[rng.integers(len(graded))]
    corrupted = batch["targets"].copy()
    corrupted[b, t] = (corrupted[b, t] + 1) % task.vocab_size
    worse = task.accuracy(corrupted, batch)
    assert worse["accuracy"] < 1.0 and worse["token_accuracy"] < 1.0
    ungraded = np.argwhere(batch["loss_mask"] == 0)
    b, t = ungraded[rng.integers(len(ungraded))]
    off_mask = batch["targets"].copy()
    off_mask[b, t] = (off_mask[b, t] + 1) % task.vocab_size
    assert task.accuracy(off_mask, batch)["accuracy"] == 1.0  # ungraded positions do not count
    with pytest.raises(ValueError, match="argmax"):
        task.accuracy(np.zeros((3, 53, 2)), batch)


@pytest.mark.parametrize("options", [{}, {"num_pairs": 6, "num_queries": 6, "vocab": 30}, {"num_queries": 2}])
def test_mqar_answers_match_the_stored_pairs(options, seed):
    task = get_task("mqar", **options)
    seq_len = 47
    pairs, queries = task.sizes(seq_len)
    batch = task.batch(seed, 1, 5, seq_len)
    for b in range(5):
        row = np.concatenate([batch["inputs"][b], batch["targets"][b, -1:]])
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs
        assert np.all((1 <= keys) & (keys < task.first_value_id))
        assert np.all((task.first_value_id <= values) & (values < task.vocab))
        stored = dict(zip(keys.tolist(), values.tolist()))
        graded = np.flatnonzero(batch["loss_mask"][b])
        assert len(graded) == queries
        asked = batch["inputs"][b, graded]
        assert len(set(asked.tolist())) == queries
        for position in graded:
            assert position >= 2 * pairs
            assert stored[int(batch["inputs"][b, position])] == batch["targets"][b, position]


def test_mqar_defaults_fill_the_row():
    task = get_task("mqar")
    assert task.vocab_size <= 256 and task.sizes(63) == (16, 16) and task.sizes(3) == (1, 1)
    assert task.sizes(4000) == (task.num_keys, task.num_keys)  # capped by the distinct keys
    assert get_task("mqar", num_queries=4).sizes(63) == (28, 4)


def test_copy_second_half_repeats_the_first(seed):
    task = get_task("copy", vocab=9)
    batch = task.batch(seed, 0, 4, 30)
    row = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    np.testing.assert_array_equal(row[:, :15], row[:, 16:])
    assert np.all(row[:, 15] == task.sep_id) and np.all(row[:, :15] >= 2)
    np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][0]), np.arange(15, 30))


def slow_arith_accuracy(predictions, batch):
    """Problem by problem from the text: an answer counts when every graded target in its line is predicted."""
    solved = total = 0
    for b in range(batch["inputs"].shape[0]):
        t = 0
        while t < batch["inputs"].shape[1]:
            if batch["loss_mask"][b, t]:
                end = t
                while end < batch["inputs"].shape[1] and batch["loss_mask"][b, end]:
                    end += 1
                total += 1
                solved += all(predictions[b, i] == batch["targets"][b, i] for i in range(t, end))
                t = end
            else:
                t += 1
    return solved / total


@pytest.mark.parametrize("ops", ["+", "-", "*", "+-*"])
def test_arith_rows_are_right_and_graded_on_answers(ops, seed, rng):
    task = get_task("arith", digits=3, ops=ops)
    tok = ByteTokenizer()
    batch = task.batch(seed, 2, 3, 71)
    for b in range(3):
        n = int(batch["segment_ids"][b].sum())
        text = tok.decode(np.append(batch["inputs"][b, :n], batch["targets"][b, n - 1]))
        lines = text.split("\n")
        assert lines[-1] == "" and len(lines) >= 2
        graded_text = "".join(chr(c) for c in batch["targets"][b][batch["loss_mask"][b] > 0])
        assert graded_text == "".join(line.split("=")[1] + "\n" for line in lines[:-1])
        for line in lines[:-1]:
            a, op, c, answer = re.fullmatch(r"(\d+)([-+*])(\d+)=(-?\d+)", line).groups()
            assert op in ops and len(a) <= 3 and len(c) <= 3
            assert int(answer) == {"+": int(a) + int(c), "-": int(a) - int(c), "*": int(a) * int(c)}[op]
    noisy = np.where(rng.random(batch["targets"].shape) < 0.05, 48, batch["targets"])
    assert task.accuracy(noisy, batch)["accuracy"] == pytest.approx(slow_arith_accuracy(noisy, batch))


def test_arith_problem_and_score(rng):
    for _ in range(50):
        prompt, answer = arith_problem(rng, 5, "+-*")
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert score_arith(answer + "\nmore text", answer) and score_arith(f" {answer} ", answer)
        assert not score_arith(answer + "0", answer) and not score_arith("", answer)
    assert arith_problem(np.random.default_rng(7), 4) == arith_problem(np.random.default_rng(7), 4)


def test_arith_min_seq_len_holds_the_longest_problem():
    for ops, longest in (("*", "999*999=998001\n"), ("+-", "999+999=1998\n"), ("-", "100-999=-899\n")):
        assert get_task("arith", digits=3, ops=ops).min_seq_len == len(longest) - 1


def test_bad_options_raise_naming_the_argument():
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        get_task("sort")
    with pytest.raises(ValueError, match=r"no option\(s\) \['digits'\]"):
        get_task("mqar", digits=3)
    with pytest.raises(ValueError, match="num_pairs=200 exceeds the 127 distinct keys"):
        get_task("mqar", num_pairs=200)
    with pytest.raises(ValueError, match="num_queries=5 exceeds num_pairs=4"):
        get_task("mqar", num_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="vocab must be an integer >= 3"):
        get_task("copy", vocab=2)
    with pytest.raises(ValueError, match="ops must be distinct operators"):
        get_task("arith", ops="+/")
    with pytest.raises(ValueError, match="digits=12 exceeds 9"):
        get_task("arith", digits=12)
    for name, options in TASK_CONFIGS:
        task = get_task(name, **options)
        with pytest.raises(ValueError, match=f"seq_len={task.min_seq_len - 1} is too short"):
            task.batch(0, 0, 1, task.min_seq_len - 1)
        task.batch(0, 0, 1, task.min_seq_len)  # the minimum itself works
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        get_task("copy").batch(-1, 0, 1, 8)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        get_task("copy").batch(0, 0, 0, 8)
    assert set(TASKS) == {"mqar", "copy", "arith", "chains", "countdown"}
