"""Prompt templates: `render(record, template)` turns a normalised record into (prompt, response) text.

The prompt is what the model reads, the response what it must produce; `batches.tokenize` tokenises the
two separately and appends EOS to the response, so no template writes EOS itself.

- ``alpaca``: the Stanford Alpaca prompts used by MetaMath and Trans-PEFT for math and code, ending in
  ``### Response:`` with the response following directly (docs/method.md §4).
- ``commonsense``: the LLM-Adapters text for Commonsense170K: the same Alpaca wording, with the answer on
  the line after ``### Response:``. Whether the loss covers the whole string is `DataConfig.loss_on`.
- ``chat``: the tokenizer's chat template, one user turn, ``add_generation_prompt=True``.
- ``plain``: instruction, then input on its own line when present, then a newline.
"""

from __future__ import annotations

from jtranspeft.data.config import TEMPLATES

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for an instruction, with the ``### Input:`` variant when `input_text` is non-empty."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def render(record: dict, template: str, tokenizer=None) -> tuple[str, str]:
    """Returns (prompt, response) for a record with ``instruction``, ``input`` and ``output`` strings.

    ``chat`` needs a `tokenizer` that has a chat template; the other templates ignore it.
    """
    instruction, input_text, output = record["instruction"], record.get("input") or "", record["output"]
    if template == "alpaca":
        return alpaca_prompt(instruction, input_text), output
    if template == "commonsense":
        return alpaca_prompt(instruction, input_text) + "\n", output
    if template == "plain":
        return instruction + (f"\n{input_text}" if input_text else "") + "\n", output
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.template 'chat' needs a tokenizer with a chat template; this one has none")
        content = instruction + (f"\n\n{input_text}" if input_text else "")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        return prompt, output
    raise ValueError(f"data.template must be one of {', '.join(TEMPLATES)}; got {template!r}")
