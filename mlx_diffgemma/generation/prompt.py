"""What a generation's prompt becomes: token ids, from text (encoded as is), ids, or chat
messages (rendered with the chat template), with their images expanded and
preprocessed. No array framework (the torch path shares it)."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..images.load import ImageError, ImageSource
from ..images.processor import ImageInputs, is_messages, processor_for, split_image_parts, user_message
from ..models.tokenizer import encode_text, ensure_chat_template, render


def prompt_ids(tokenizer, prompt) -> List[int]:
    """Token ids of a prompt given as text (encoded as is, no chat template) or as ids (a
    list, or any array with `tolist`: NumPy, MLX, torch)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
        return [int(t) for t in tokenizer.encode(prompt)]
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    return [int(t) for t in np.asarray(prompt).reshape(-1).tolist()]


def prepare_prompt(model, tokenizer, prompt: Any, images: Optional[Sequence[ImageSource]] = None,
                   chat: bool = False) -> Tuple[Any, Optional[ImageInputs]]:
    """A generation prompt with its images: (prompt or expanded ids, the images' arrays or
    None). `prompt` is text or ids (one image placeholder per image in `images`), or
    chat messages (rendered with the chat template; image content parts carry the
    images). Without images, text and ids come back as they are. `chat=True` makes text
    one user message (the images before it), rendered with the chat template."""
    if chat:
        if not isinstance(prompt, str):
            raise ValueError("chat=True takes the prompt as text (one user message); pass chat "
                             "messages as they are, or token ids without chat=True")
        prompt, images = [user_message(prompt, images or ())], None
    if is_messages(prompt):
        ensure_chat_template(tokenizer, getattr(model, "model_path", None))
        if images:
            raise ImageError("give the images of chat messages as their image content parts, "
                             "not as images=")
        msgs, sources = split_image_parts(prompt)
        if not sources:
            return encode_text(tokenizer, render(tokenizer, msgs, True)), None
        p = processor_for(model, tokenizer).apply_chat_template(prompt)
        return p.ids, p.images
    if not images:
        return prompt, None
    p = processor_for(model, tokenizer)(prompt, images)
    return p.ids, p.images
