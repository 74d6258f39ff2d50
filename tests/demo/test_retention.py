"""The text-only retention check: its scoring rule, and that its prompts never leak into the replay data."""

from minillava.demo import retention


def test_an_answer_counts_as_whole_words_after_normalisation():
    assert retention.correct("The capital of France is Paris.", ("paris",))
    assert retention.correct("A week is seven days.", ("7",))
    assert not retention.correct("Parisian food is great.", ("paris",))
    assert not retention.correct("capital", ("paris",))
    assert retention.correct("Plants absorb carbon dioxide (CO2).", ("carbon dioxide", "co2"))


def test_the_replay_prompts_are_not_the_checked_ones():
    checked = {p.lower() for p, _ in retention.CHECK}
    assert not checked & {p.lower() for p in retention.REPLAY}
    assert len(retention.CHECK) >= 30 and len(set(retention.REPLAY)) == len(retention.REPLAY)
