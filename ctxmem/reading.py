"""Reading a long text file into a prompt: decoding policy and chat formatting (used by `ask`)."""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input (unreadable, empty or binary file); the message names the file."""


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file. Policy: invalid bytes are replaced (U+FFFD) and reported by the
    caller; a file with NUL bytes is treated as binary and refused; an empty file is refused."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read context file {p}: {e.strerror or e}") from None
    if not data.strip():
        raise InputError(f"context file {p} is empty")
    if b"\x00" in data[:1 << 20]:
        raise InputError(f"context file {p} looks binary (contains NUL bytes); give a text file")
    return data.decode("utf-8", errors="replace")


def build_prompt(tok, context: str, question: str, knowledge: str | None = None) -> list[int]:
    """Chat prompt: [knowledge notes] + document + question, with the question last (it is what the
    final prefill chunk and the embedder's query see)."""
    parts = []
    if knowledge:
        parts.append(f"Relevant notes:\n{knowledge}\n")
    if context:
        parts.append(f"Document:\n{context}\n")
    parts.append(f"Answer the question using the text above.\nQuestion: {question}")
    messages = [{"role": "user", "content": "\n".join(parts)}]
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
    return tok(messages[0]["content"] + "\nAnswer:", add_special_tokens=True)["input_ids"]


_QUESTION_HEAD = "Answer the question using the text above."


def build_prompt_parts(tok, context: str, question: str, knowledge: str | None = None) -> tuple[list[int], list[int]]:
    """The prompt split where a saved memory ends: (document part, question part).

    The document part depends only on the document, so it can be read once, saved, and followed by
    any question later; knowledge notes (they depend on the question) go in the question part.
    The parts are tokenized separately and always used together, reading and answering alike.
    """
    parts = [f"Document:\n{context}\n"]
    if knowledge:
        parts.append(f"Relevant notes:\n{knowledge}\n")
    parts.append(f"{_QUESTION_HEAD}\nQuestion: {question}")
    content = "\n".join(parts)
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
    else:
        text = (tok.bos_token or "") + content + "\nAnswer:"
    cut = text.index(f"Document:\n{context}\n") + len(f"Document:\n{context}\n") + 1
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return enc(text[:cut]), enc(text[cut:])
