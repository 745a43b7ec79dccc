"""Records (chat or interleaved document, see `vlm.data.format`) -> text pieces marked supervised or not.

Chat records use the tokenizer's own chat template when it has one (assistant spans found by rendering the
conversation prefix by prefix); otherwise the plain template below. Images become `<image>` markers at their
place in the text; the processor expands them to placeholders and masks them out of the labels.

Plain template (tokenizers without a chat template, e.g. the built-in byte tokenizer):

    {system}\\n\\n                       (only if there is a system message)
    User: {user text}\\n
    Assistant: {assistant text}</s>\\n    (" {assistant text}</s>" is supervised)
"""

from __future__ import annotations

Pieces = list[tuple[str, bool]]


def content_text(content, image_token: str) -> str:
    """OpenAI message content (str or list of text / image_url / video parts) -> text with image markers."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append(part["text"])
        elif kind in ("image_url", "video"):  # a video is one media item: one marker
            out.append(image_token)
        else:
            raise ValueError(f"unsupported content part type {kind!r}")
    return "".join(out)


def chat_pieces(messages: list[dict], tokenizer, image_token: str) -> tuple[Pieces, bool]:
    """(pieces, add_bos). Only assistant turns are supervised."""
    msgs = [{"role": m["role"], "content": content_text(m.get("content"), image_token)} for m in messages]
    for m in msgs:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported role {m['role']!r}")
    if getattr(tokenizer, "chat_template", None):
        return _templated(msgs, tokenizer), False
    pieces: Pieces = []
    for m in msgs:
        if m["role"] == "system":
            pieces.append((m["content"] + "\n\n", False))
        elif m["role"] == "user":
            pieces.append((f"User: {m['content']}\n", False))
        else:
            pieces += [("Assistant:", False), (f" {m['content']}{tokenizer.eos_token}", True), ("\n", False)]
    return pieces, True


def generation_prompt(messages: list[dict], tokenizer, image_token: str) -> tuple[str, bool]:
    """The unsupervised prompt that asks the model for the next assistant turn: (text, add_bos)."""
    msgs = [{"role": m["role"], "content": content_text(m.get("content"), image_token)} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
    pieces, add_bos = chat_pieces(msgs, tokenizer, image_token)
    return "".join(text for text, _ in pieces) + "Assistant:", add_bos


def document_pieces(record: dict, tokenizer) -> tuple[Pieces, bool]:
    """Interleaved documents: all text is supervised (the image markers are masked by the processor)."""
    return [(record["text"] + (tokenizer.eos_token or ""), True)], True


def _templated(msgs: list[dict], tokenizer) -> Pieces:
    render = lambda m, gen=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
    pieces: Pieces = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, full = render(msgs[:i], True), render(msgs[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix; "
                             "assistant spans cannot be located")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(msgs)[len(done):]
    if rest:
        pieces.append((rest, False))
    return pieces
