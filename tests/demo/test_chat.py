import io

from minillava.chat import ChatSession
from minillava.generate import GenerationConfig, Generator


def test_chat_keeps_history_and_switches_images(tiny):
    session = ChatSession(Generator(*tiny), GenerationConfig(max_new_tokens=4))
    stdin = io.StringIO(
        "what is this?\nand now?\n/image examples/images/astronaut.jpg\nwho?\n/image /nope.png\n/reset\nhi\n"
    )
    stdout = io.StringIO()
    assert session.repl("examples/images/chelsea.jpg", stdin, stdout) == 0
    out = stdout.getvalue()
    assert "(new image; conversation reset)" in out and "/nope.png: cannot open" in out
    assert "(conversation reset)" in out
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # after /reset: one turn
    assert not session.messages[0]["content"].startswith("<image>") or session.image is not None


def test_first_turn_carries_the_image(tiny):
    session = ChatSession(Generator(*tiny), GenerationConfig(max_new_tokens=3))
    session.set_image("examples/images/chelsea.jpg")
    answer = "".join(session.ask("what is this?"))
    "".join(session.ask("more?"))
    assert session.messages[0]["content"] == "<image>\nwhat is this?"
    assert session.messages[1]["content"] == answer.strip()
    assert session.messages[2]["content"] == "more?" and len(session.messages) == 4
