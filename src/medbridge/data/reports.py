"""Radiology report sections (MIMIC-CXR style free text)."""

from __future__ import annotations

import re

_HEADER = re.compile(r"\n ?([A-Z][A-Z ()/,-]+):\s", re.MULTILINE)
_ALIASES = {"CONCLUSION": "IMPRESSION", "CONCLUSIONS": "IMPRESSION", "FINDINGS AND IMPRESSION": "IMPRESSION"}


def report_sections(text: str) -> dict[str, str]:
    """Split a report into {SECTION: text}; text before the first header is under "PREAMBLE".
    Headers are upper-case words followed by a colon at a line start (MIMIC-CXR's section_parser convention)."""
    text = "\n" + text.replace("\r\n", "\n")
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    pre = text[: matches[0].start()] if matches else text
    if pre.strip():
        sections["PREAMBLE"] = " ".join(pre.split())
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = _ALIASES.get(m.group(1).strip(), m.group(1).strip())
        body = " ".join(text[m.end(): nxt.start() if nxt else len(text)].split())
        sections[name] = (sections[name] + " " + body).strip() if name in sections else body
    return sections


def findings_impression(text: str) -> str | None:
    """FINDINGS + IMPRESSION of a report (either alone if only one exists), else its last paragraph."""
    sec = report_sections(text)
    parts = [sec[k] for k in ("FINDINGS", "IMPRESSION") if sec.get(k)]
    if parts:
        return " ".join(parts)
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return " ".join(paragraphs[-1].split()) if paragraphs else None
