"""Stop strings over streamed text: the text a client sees ends just before the first stop string to complete, and
nothing that might turn out to be the start of one is shown early (it waits for the next delta). The result does
not depend on how the text is split into deltas."""


class StopMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """The next piece of generated text -> the part that can be shown now (empty once stopped)."""
        if self.stopped:
            return ""
        text = self._held + delta
        # the stop that completes first wins (as if generation had gone one character at a time); of stops ending
        # at the same place, the longest
        hits = [(i + len(s), -len(s)) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if hits:
            end, neg_len = min(hits)
            self.stopped, self._held = True, ""
            return text[:end + neg_len]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The end of generation: text held back as a possible stop prefix is shown after all."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held
