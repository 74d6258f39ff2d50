"""A multi-turn conversation about an image, kept as messages; the terminal loop on top of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

from minillava.generate import GenerationConfig, Generator
from minillava.images import ImageError, load_image

HELP = "commands: /image PATH (switch image, starts a new conversation), /reset, /quit"


@dataclass
class ChatSession:
    generator: Generator
    config: GenerationConfig
    image: object | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def open(
        cls, model_dir: str, dtype: str, max_new_tokens: int, temperature: float, quantize: str | None = None
    ) -> ChatSession:
        from minillava.interop.exported import load_for_inference

        model, processor = load_for_inference(model_dir, dtype, quantize=quantize)  # exports too
        return cls(
            Generator(model, processor), GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        )

    def set_image(self, path: str) -> None:
        self.image = load_image(path)  # checked now, so a bad path fails at /image, not mid-answer
        self.messages = []

    def ask(self, text: str):
        """Stream the answer to one user turn; the turn and the answer join the history."""
        first = not self.messages and self.image is not None
        content = f"<image>\n{text}" if first else text
        self.messages.append({"role": "user", "content": content})
        images = [self.image] if self.image is not None else []
        answer = []
        for piece in self.generator.stream(self.messages, images, self.config):
            answer.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(answer).strip()})

    def repl(self, image: str | None, stdin: TextIO, stdout: TextIO) -> int:
        if image:
            self.set_image(image)
        print(HELP, file=stdout)
        while True:
            print(">>> ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                self.messages = []
                print("(conversation reset)", file=stdout)
                continue
            if line.startswith("/image"):
                try:
                    self.set_image(line[len("/image") :].strip())
                    print("(new image; conversation reset)", file=stdout)
                except ImageError as e:
                    print(f"error: {e}", file=stdout)
                continue
            for piece in self.ask(line):
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout)
