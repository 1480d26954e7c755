"""What a generation yields: a `Draft` per denoising step, a `Commit` per canvas, a final
`Summary` (or, for speculative drafting, a `SpeculativeSummary`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union


@dataclass
class Draft:
    """One denoising step of one canvas (batch row 0)."""

    canvas_index: int
    step: int  # the reference's counter: N at the first step, 1 at the last
    tokens: List[int]  # the argmax canvas
    accepted: List[bool]  # positions that took the denoiser's sample this step (or are fixed)
    kind: str = "draft"
    fixed: Optional[List[bool]] = None  # positions the canvas holds fixed (fixed.py), or None
    candidate: Optional[int] = None  # an infill's candidate middle length (infilling.py), or None


@dataclass
class Commit:
    """A canvas committed to the output."""

    canvas_index: int
    tokens: List[int]  # committed ids, EOS kept, padding after it removed
    text: str  # new text this canvas adds
    steps: int  # denoising steps it took
    finished: bool  # it held an EOS: generation ends here
    kind: str = "commit"


@dataclass
class Summary:
    tokens: List[int]  # all generated ids, EOS padding removed, at most max_new_tokens
    text: str
    prompt_tokens: int
    canvases: int
    steps_per_canvas: List[int]
    tokens_per_forward: float
    prompt_time: float
    prompt_tps: float
    generation_time: float
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str  # "eos" or "length"
    # `tokens` that are not pad: what tokens_per_forward and generation_tps count (a
    # canvas may hold pads before its EOS, or everywhere without one)
    valid_tokens: int = -1
    kind: str = "summary"

    def __post_init__(self):
        if self.valid_tokens < 0:
            self.valid_tokens = len(self.tokens)

    @property
    def pad_tokens(self) -> int:
        return len(self.tokens) - self.valid_tokens


@dataclass
class SpeculativeSummary(Summary):
    """A speculative run's summary (speculative.py): each "canvas" is one draft-and-verify
    round, `steps_per_canvas` the drafter's denoising steps in it, `tokens_per_forward`
    the tokens kept per target forward."""

    block_size: int = 0  # k: draft tokens proposed per round
    acceptance_length: float = 0.0  # tokens kept per round: accepted drafts + the target's own
    target_forwards: int = 0  # verify forwards (the prompt's prefill not counted)
    drafter_forwards: int = 0  # denoising steps plus encodes of the kept tokens
    kind: str = "summary"


Event = Union[Draft, Commit, Summary]
