"""The one formatter: it turns examples into the text the model is trained on AND prompted with.

A sequence is ``header + prompt(x1) + answer(y1) + prompt(x2) + answer(y2) + ... + continuation``:

- ``prompt(x)``   = input_prefix + x + output_prefix                     (never supervised)
- ``answer(y)``   = answer_prefix + y + delimiter                         (the supervised target)
- ``continuation`` = the text that opens the next example (``"Input:"``).

The continuation is there because tokenizers merge across boundaries: SmolLM2 encodes "\\n\\n" as ONE token
at the end of a text but as two inside running text. Ending every sequence with the start of a next example
makes the last answer's delimiter tokenize exactly like every other one, at training and at evaluation.

Chat mode renders each example as a user turn and an assistant turn with the tokenizer's chat template;
the target is then the assistant content plus the end-of-turn marker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

from manyicl.errors import ManyICLError
from manyicl.families import FAMILIES
from manyicl.tasks import answer_form, choice_text

MAX_HINT_LABELS = 3


@dataclass(frozen=True)
class Template:
    instruction: str = ""
    input_prefix: str = "Input: "
    output_prefix: str = "\nOutput:"
    answer_prefix: str = " "
    delimiter: str = "\n\n"
    chat: bool = False
    label_hint: bool = True  # name a small label set before each answer (families with label_hint, families.py)

    @classmethod
    def for_family(cls, family: str, labels: Sequence[str] = (), **overrides: Any) -> "Template":
        """The default format of a family. Small label sets are named before each answer ("Label (negative or
        positive):"): measured on sst2 with SmolLM2-135M this is what brings the untuned model's prompting to
        lm-evaluation-harness's level (docs/EVALUATION.md); larger sets would cost too many tokens per example."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ManyICLError(f"template: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        word = FAMILIES[family].answer_word
        if overrides.get("label_hint", True) and FAMILIES[family].label_hint and 2 <= len(labels) <= MAX_HINT_LABELS:
            word += f" ({' or '.join(labels)})"
        return replace(cls(output_prefix=f"\n{word}:"), **overrides)


@dataclass(frozen=True)
class Rendered:
    """Formatted text with the character spans of every example and of every answer (target)."""

    text: str
    example_spans: list[tuple[int, int]]
    target_spans: list[tuple[int, int]]


class Formatter:
    def __init__(self, template: Template, tokenizer: Any = None, answer_form: str = "label"):
        self.template = template
        # how answers are written (tasks.answer_form): decided here, once, so that a training sequence supervises
        # exactly the answer text that evaluation scores (cloze: the option text, never its letter)
        self.answer_form = answer_form
        if template.chat:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ManyICLError("template.chat: the model's tokenizer has no chat template; set template.chat=false")
            self._header, self._user_open, self._assistant_open, self._assistant_close = _chat_pieces(
                tokenizer, template.instruction
            )

    @classmethod
    def for_task(cls, task: Any, tokenizer: Any = None, chat: bool | None = None, multiple_choice: str = "cloze",
                 **overrides: Any) -> "Formatter":
        options = {**task.template, **overrides}
        if chat is not None:
            options["chat"] = chat
        return cls(Template.for_family(task.family, task.labels or (), **options), tokenizer,
                   answer_form(task, multiple_choice))

    def target(self, example: Any) -> str:
        """The answer of an example as it is written after its prompt (and supervised, and scored)."""
        return choice_text(example, example.output) if self.answer_form == "cloze" else example.output

    # ---- the pieces
    @property
    def header(self) -> str:
        if self.template.chat:
            return self._header
        return f"{self.template.instruction}\n\n" if self.template.instruction else ""

    def prompt(self, input_text: str) -> str:
        t = self.template
        if t.chat:
            return self._user_open + input_text + self._assistant_open
        return t.input_prefix + input_text + t.output_prefix

    def answer(self, output: str) -> str:
        t = self.template
        if t.chat:
            return output + self._assistant_close
        return t.answer_prefix + output + t.delimiter

    @property
    def delimiter(self) -> str:
        """The end-of-answer marker; generation stops when it appears."""
        return self._assistant_close.strip() if self.template.chat else self.template.delimiter

    @property
    def continuation(self) -> str:
        if self.template.chat:
            return self._user_open
        return self.template.input_prefix.rstrip()

    def strip_answer(self, generated: str) -> str:
        """The answer inside generated text: everything before the delimiter, trimmed."""
        cut = generated.find(self.delimiter) if self.delimiter else -1
        return (generated if cut < 0 else generated[:cut]).strip()

    # ---- whole sequences
    def render(self, examples: Sequence[Any], query: str | None = None) -> Rendered:
        """Demonstrations/targets, then optionally an unanswered query (the evaluation prompt).

        With a query the text ends at the query's output prefix; otherwise it ends with the continuation.
        """
        parts = [self.header]
        pos = len(self.header)
        example_spans, target_spans = [], []
        for ex in examples:
            p, a = self.prompt(ex.input), self.answer(self.target(ex))
            example_spans.append((pos, pos + len(p) + len(a)))
            target_spans.append((pos + len(p), pos + len(p) + len(a)))
            parts += [p, a]
            pos += len(p) + len(a)
        parts.append(self.prompt(query) if query is not None else self.continuation)
        return Rendered("".join(parts), example_spans, target_spans)


def _chat_pieces(tokenizer: Any, instruction: str) -> tuple[str, str, str, str]:
    """Split the chat template into header, user-open, assistant-open and assistant-close strings.

    Found by rendering probe conversations; templates that are not a plain concatenation of turns are refused.
    """
    u1, a1, u2 = "\x00U1\x00", "\x00A1\x00", "\x00U2\x00"
    system = [{"role": "system", "content": instruction}] if instruction else []

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=generation_prompt)

    one = render([{"role": "user", "content": u1}], True)
    two = render([{"role": "user", "content": u1}, {"role": "assistant", "content": a1}], False)
    three = render(
        [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}], True
    )
    ok = two.startswith(one) and three.startswith(two) and two[len(one) :].startswith(a1) and u2 in three[len(two) :]
    if not ok:
        raise ManyICLError("template.chat: this chat template does not render turns independently; "
                           "set template.chat=false")
    assistant_close = two[len(one) + len(a1) :]
    user_open, assistant_open = three[len(two) :].split(u2)
    head_and_user = one[: one.index(u1)]
    if not head_and_user.endswith(user_open) or not one.endswith(assistant_open):
        raise ManyICLError("template.chat: the first user turn renders differently from later ones; "
                           "set template.chat=false")
    return head_and_user[: len(head_and_user) - len(user_open)], user_open, assistant_open, assistant_close
