"""Where the video and text tokens sit in an attention sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._validation import check_int

TextPosition = Literal["none", "before", "after"]
_TEXT_POSITIONS = ("none", "before", "after")


@dataclass(frozen=True)
class VideoLayout:
    """Token layout of one attention sequence: a latent video of ``frames x height x width``
    tokens in raster (t, h, w) order, plus ``text_len`` text tokens placed before or after it
    (joint attention, e.g. CogVideoX "before", HunyuanVideo "after").

    An image is a video of one frame.
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: TextPosition = "none"

    def __post_init__(self) -> None:
        check_int("frames", self.frames, 1)
        check_int("height", self.height, 1)
        check_int("width", self.width, 1)
        check_int("text_len", self.text_len, 0)
        if self.text_position not in _TEXT_POSITIONS:
            raise ValueError(
                f"text_position must be one of {_TEXT_POSITIONS}, got {self.text_position!r}"
            )
        if self.text_len > 0 and self.text_position == "none":
            raise ValueError(
                f"text_len={self.text_len} needs text_position 'before' or 'after', got 'none'"
            )
        if self.text_len == 0 and self.text_position != "none":
            raise ValueError(
                f"text_position={self.text_position!r} needs text_len > 0, got text_len=0"
            )

    @property
    def frame_tokens(self) -> int:
        """Tokens in one frame: height * width."""
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        """frames * height * width."""
        return self.frames * self.frame_tokens

    @property
    def num_tokens(self) -> int:
        """Sequence length N = video tokens + text tokens."""
        return self.video_tokens + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token in the sequence."""
        return self.text_len if self.text_position == "before" else 0

    @property
    def text_start(self) -> int:
        """Index of the first text token in the sequence (== video_tokens when text is after)."""
        return 0 if self.text_position == "before" else self.video_tokens

    def check_sequence_length(self, seq_len: int, name: str = "query") -> None:
        """Raise ``ValueError`` unless ``seq_len`` equals this layout's token count."""
        if seq_len != self.num_tokens:
            text = f" + {self.text_len} text" if self.text_len else ""
            raise ValueError(
                f"{name} has sequence length {seq_len}, but layout {self.frames}x{self.height}x"
                f"{self.width}{text} expects {self.num_tokens} tokens"
            )
