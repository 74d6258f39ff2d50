"""The text-only retention check: its scoring rule, and that its prompts never leak into the replay data or into
each other (validation and test)."""

from minillava.demo import retention


def test_an_answer_counts_as_whole_words_after_normalisation():
    assert retention.correct("The capital of France is Paris.", ("paris",))
    assert retention.correct("A week is seven days.", ("7",))
    assert not retention.correct("Parisian food is great.", ("paris",))
    assert not retention.correct("capital", ("paris",))
    assert retention.correct("Plants absorb carbon dioxide (CO2).", ("carbon dioxide", "co2"))


def test_the_replay_and_the_two_checks_share_no_prompt():
    """Three disjoint sets: what training replays, what recipes are chosen on, what is reported."""
    test = {p.lower() for p, _ in retention.CHECK}
    validation = {p.lower() for p, _ in retention.VALIDATION_CHECK}
    replay = {p.lower() for p in retention.REPLAY}
    assert not test & replay and not validation & replay and not test & validation
    assert len(test) >= 30 and len(validation) >= 30 and len(replay) == len(retention.REPLAY)
