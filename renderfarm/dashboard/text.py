"""Text from Redis made safe for the page's markdown (st.markdown, st.caption, st.info, ... all render it).

A prompt, a job id, a drain reason or a parsed image parameter is written by someone else: as markdown it
could draw links, remote images (which the operator's browser then fetches), LaTeX, colour directives or a
heading on the operator's page. Every ASCII punctuation character may be backslash-escaped in CommonMark, so
escaping all of them leaves the text shown as written and nothing else: `[`, `!`, `(`, `<`, `*`, `$`, `:`
(no `:red[...]` directive, no `:material/...:` icon, no `http://` autolink), `.` (no `www.` autolink).
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def md(value: object, limit: int | None = None) -> str:
    """`value` as text that markdown shows literally, on one line, cut to `limit` characters (with "…")."""
    text = _LINE_BREAKS.sub(" ", str(value))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return _PUNCTUATION.sub(r"\\\1", text)
