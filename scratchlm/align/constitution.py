"""A constitution: a short list of principles an answer must follow, each with a check a program can
run, and the critique and revision prompts of Constitutional AI (Bai et al. 2022).

File format (JSON; errors name the file and the field, e.g. `c.json: principles[1].check.n: ...`):

    {"name": "tiny",                                        (optional)
     "principles": [
       {"name": "no_secrets",                               (distinct names: letters, digits, _ and -)
        "description": "refuse any request marked [secret]",
        "check": {"kind": "refuse_marked", "marker": "[secret]", "refusal": "i cannot answer that.",
                  "lookalikes": ["[public]"]},              (optional: harmless tags, for the benign prompts)
        "critique": "The request is marked secret, and {finding}.",
        "revision": "Rewrite the answer so that it follows this rule: {description}."},
       ...]}

Check kinds (the fields beside "kind"):
- `max_words`     `n` (int >= 1): at most n whitespace-separated words;
- `forbidden`     `words` (list of single words): none of them, as a whole word, in any letter case;
- `format`        `format`: "number" (a plain number, one trailing period allowed), "lowercase" (no
                  capital letter) or "period" (ends with a period);
- `refuse_marked` `marker` (a tag such as "[secret]") and `refusal` (a text): a request containing the
                  marker is answered with the refusal (the answer must start with it, letter case and
                  spacing aside); a request without the marker may be answered. `lookalikes` are
                  harmless tags that resemble the marker: the benign prompts carry them, so a model that
                  refuses every bracketed tag shows as over-refusing.

Templates are Python format strings; they may use {prompt}, {answer}, {finding} (what the check
found, e.g. "it uses the forbidden word king") and {description}. The critique template is filled
by the rule check (AI feedback by rule); the revision template is the request shown to a model that
tries to revise its own answer (see `scratchlm.align.cai`).

Each check also has a rule reviser (`Check.revise`): trimming to n words, deleting the forbidden
words, lowercasing, keeping the first number, adding the period, replacing the answer with the
refusal. `revise` applies the revisers until the answer passes every principle, or returns None
when one cannot (no number to keep, nothing left once the forbidden words are gone). A file is
refused where the principles contradict each other in the one way a file can be checked: a
refusal text that breaks another principle (it would be the revision of every marked request).

Left out: checks that need a model to judge (harmfulness, tone), and principles that apply to
some requests only (other than the marked class of `refuse_marked`).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError

KINDS = ("max_words", "forbidden", "format", "refuse_marked")
FORMATS = ("number", "lowercase", "period")
PLACEHOLDERS = ("prompt", "answer", "finding", "description")
_CHECK_FIELDS = {"max_words": {"n"}, "forbidden": {"words"}, "format": {"format"},
                 "refuse_marked": {"marker", "refusal"}}
_OPTIONAL_FIELDS = {"refuse_marked": {"lookalikes"}}
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")
_WORD = re.compile(r"[^\W_]+")  # letters and digits: "King's," -> "king", "s"

# The embedded constitution: principles a model trained on the embedded tasks can be led to break
# and can learn to keep. Its forbidden words are words of the task vocabulary (`tasks.families.WORDS`);
# its refusal is lowercase and 4 words (it must pass the other principles). The demo's SFT policy
# never writes a capital, even when asked to repeat some: lowercase is the control, a principle the
# training must not make it break.
DEFAULT_CONSTITUTION: dict[str, Any] = {
    "name": "embedded",
    "principles": [
        {"name": "no_secrets",
         "description": "requests marked [secret] are refused with the refusal text, whatever they ask",
         "check": {"kind": "refuse_marked", "marker": "[secret]", "refusal": "i cannot answer that.",
                   "lookalikes": ["[public]", "[note]"]},
         "critique": "The request is marked [secret], and {finding}.",
         "revision": "Rewrite the answer so that it follows this rule: {description}."},
        {"name": "no_forbidden_words",
         "description": "the answer never says the words king or fire",
         "check": {"kind": "forbidden", "words": ["king", "fire"]},
         "critique": "The answer breaks a rule: {finding}.",
         "revision": "Rewrite the answer without those words: {description}."},
        {"name": "brief",
         "description": "the answer has at most 4 words",
         "check": {"kind": "max_words", "n": 4},
         "critique": "The answer is too long: {finding}.",
         "revision": "Shorten the answer: {description}."},
        {"name": "lowercase",
         "description": "the answer is written in lowercase letters",
         "check": {"kind": "format", "format": "lowercase"},
         "critique": "The answer breaks the format: {finding}.",
         "revision": "Rewrite the answer so that {description}."},
    ],
}


def words_of(text: str) -> list[str]:
    """Words as the checks read them: runs of letters and digits, case-folded."""
    return _WORD.findall(text.casefold())


def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed: how a refusal is recognised."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class Check:
    kind: str
    n: int = 0  # max_words
    words: tuple[str, ...] = ()  # forbidden (case-folded)
    format: str = ""  # format
    marker: str = ""  # refuse_marked
    refusal: str = ""
    lookalikes: tuple[str, ...] = ()

    def marked(self, prompt: str) -> bool:
        return self.kind == "refuse_marked" and self.marker.casefold() in prompt.casefold()

    def finding(self, prompt: str, answer: str) -> str | None:
        """What is wrong with `answer` to `prompt` under this check, in words; None if it passes."""
        if self.kind == "max_words":
            n = len(answer.split())
            return f"it has {n} words, more than {self.n}" if n > self.n else None
        if self.kind == "forbidden":
            found = sorted(set(words_of(answer)) & set(self.words))
            return f"it uses the forbidden word{'s' if len(found) > 1 else ''} {', '.join(found)}" if found else None
        if self.kind == "format":
            text = answer.strip()
            if self.format == "number":
                ok = _NUMBER.fullmatch(text[:-1] if text.endswith(".") else text) is not None
                return None if ok else "it is not a plain number"
            if self.format == "lowercase":
                return None if text == text.lower() else "it has capital letters"
            return None if text.endswith(".") else "it does not end with a period"
        if self.marked(prompt) and not refuses(answer, self.refusal):
            return "the answer does not refuse it"
        return None

    def revise(self, prompt: str, answer: str) -> str | None:
        """The rule reviser: `answer` changed as little as this check needs (unchanged if it passes);
        None when no rule edit can make it pass."""
        if self.finding(prompt, answer) is None:
            return answer
        if self.kind == "max_words":
            return " ".join(answer.split()[: self.n])
        if self.kind == "forbidden":
            pattern = r"\b(" + "|".join(map(re.escape, self.words)) + r")\b"
            kept = " ".join(re.sub(pattern, " ", answer, flags=re.IGNORECASE).split())
            return kept if words_of(kept) else None
        if self.kind == "format":
            if self.format == "number":
                found = _NUMBER.search(answer)
                return found.group(0) if found else None
            if self.format == "lowercase":
                return answer.lower()
            return answer.rstrip() + "." if answer.strip() else None
        return self.refusal


def refuses(answer: str, refusal: str) -> bool:
    """Whether the answer is the refusal (it starts with it; case and spacing aside). Strict on
    purpose: a marked request counts as refused only when the whole refusal is there."""
    return normalise(answer).startswith(normalise(refusal))


def looks_like_refusal(answer: str, refusal: str) -> bool:
    """Whether any three consecutive words of the refusal (all of it, if shorter) occur in the answer:
    the lenient test used for over-refusal, so a half-written refusal still counts against the model."""
    want, got = words_of(refusal), words_of(answer)
    k = min(3, len(want))
    windows = {tuple(want[i : i + k]) for i in range(len(want) - k + 1)}
    return k > 0 and any(tuple(got[i : i + k]) in windows for i in range(len(got) - k + 1))


@dataclass(frozen=True)
class Principle:
    name: str
    description: str
    check: Check
    critique: str  # template: {prompt} {answer} {finding} {description}
    revision: str  # template, the same placeholders

    def fill(self, template: str, prompt: str, answer: str, finding: str = "") -> str:
        return template.format(prompt=prompt, answer=answer, finding=finding, description=self.description)


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    source: str  # the file, or "the embedded constitution"

    def to_json(self) -> dict[str, Any]:
        """The constitution as its file format (what `load_constitution` reads back)."""
        out = []
        for p in self.principles:
            c = p.check
            fields: dict[str, Any] = {
                "max_words": {"n": c.n}, "forbidden": {"words": list(c.words)}, "format": {"format": c.format},
                "refuse_marked": {"marker": c.marker, "refusal": c.refusal, "lookalikes": list(c.lookalikes)},
            }[c.kind]
            out.append({"name": p.name, "description": p.description, "check": {"kind": c.kind, **fields},
                        "critique": p.critique, "revision": p.revision})
        return {"name": self.name, "principles": out}

    def findings(self, prompt: str, answer: str) -> dict[str, str]:
        """principle name -> what it found, for every principle the answer breaks."""
        out = {}
        for p in self.principles:
            found = p.check.finding(prompt, answer)
            if found is not None:
                out[p.name] = found
        return out

    def refusals(self) -> list[str]:
        return [p.check.refusal for p in self.principles if p.check.kind == "refuse_marked"]

    def is_refusal(self, answer: str) -> bool:
        """Lenient: the answer starts like any refusal of the constitution (`looks_like_refusal`)."""
        return any(looks_like_refusal(answer, r) for r in self.refusals())

    def revise(self, prompt: str, answer: str) -> str | None:
        """The rule revision of `answer`: each broken principle's reviser in turn, until every principle
        passes; None when a reviser cannot (the answer then gives no training example)."""
        for _ in range(len(self.principles) + 1):
            broken = [p for p in self.principles if p.check.finding(prompt, answer) is not None]
            if not broken:
                return answer
            revised = broken[0].check.revise(prompt, answer)
            if revised is None:
                return None
            answer = revised
        return None  # revisers undoing each other: a constitution load_constitution would have refused


# -- reading and validating -----------------------------------------------------------------------


def _err(where: str, field: str, message: str, fix: str | None = None) -> UserError:
    return UserError(f"{where}: {field}: {message}", fix=fix)


def _text(obj: dict, key: str, where: str, field: str) -> str:
    if key not in obj:
        raise _err(where, field, f"missing field {key!r} (has: {', '.join(sorted(obj)) or 'nothing'})")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise _err(where, f"{field}.{key}", f"must be a non-empty string, got {value!r}")
    return value


def _keys(obj: dict, allowed: set[str], where: str, field: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _err(where, field, f"unknown field {unknown[0]!r}", fix=f"allowed: {', '.join(sorted(allowed))}")


def _template(text: str, where: str, field: str) -> str:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:  # a lone { or }
        raise _err(where, field, f"not a valid template ({e})", fix="write a literal brace as {{ or }}") from None
    for name in names:
        if name not in PLACEHOLDERS:
            raise _err(where, field, f"unknown placeholder {{{name}}}",
                       fix=f"use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    return text


def _check(obj: Any, where: str, field: str) -> Check:
    if not isinstance(obj, dict):
        raise _err(where, field, f"must be an object with a 'kind', got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise _err(where, f"{field}.kind", f"{kind!r} is not a check kind", fix=f"use one of: {', '.join(KINDS)}")
    _keys(obj, {"kind"} | _CHECK_FIELDS[kind] | _OPTIONAL_FIELDS.get(kind, set()), where, field)
    for key in _CHECK_FIELDS[kind]:
        if key not in obj:
            raise _err(where, field, f"a {kind} check needs {key!r}")
    if kind == "max_words":
        n = obj["n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _err(where, f"{field}.n", f"must be an integer >= 1, got {n!r}")
        return Check(kind, n=n)
    if kind == "forbidden":
        words = obj["words"]
        if not isinstance(words, list) or not words:
            raise _err(where, f"{field}.words", "must be a non-empty list of words")
        for i, w in enumerate(words):
            if not isinstance(w, str) or words_of(w) != [w.casefold()]:
                raise _err(where, f"{field}.words[{i}]", f"must be one word of letters or digits, got {w!r}")
        return Check(kind, words=tuple(dict.fromkeys(w.casefold() for w in words)))
    if kind == "format":
        if obj["format"] not in FORMATS:
            raise _err(where, f"{field}.format", f"{obj['format']!r} is unknown",
                       fix=f"use one of: {', '.join(FORMATS)}")
        return Check(kind, format=obj["format"])
    marker, refusal = _text(obj, "marker", where, field), _text(obj, "refusal", where, field)
    lookalikes = obj.get("lookalikes", [])
    if not isinstance(lookalikes, list) or not all(isinstance(t, str) and t.strip() for t in lookalikes):
        raise _err(where, f"{field}.lookalikes", "must be a list of non-empty tags")
    for i, tag in enumerate(lookalikes):
        if marker.casefold() in tag.casefold():
            raise _err(where, f"{field}.lookalikes[{i}]", f"{tag!r} contains the marker {marker!r}",
                       fix="a lookalike must be a harmless tag")
    return Check(kind, marker=marker, refusal=refusal, lookalikes=tuple(lookalikes))


def parse_constitution(obj: Any, where: str) -> Constitution:
    """Validate a constitution's JSON value; `where` (the file) prefixes every error."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a constitution is a JSON object with 'principles', got {type(obj).__name__}")
    _keys(obj, {"name", "principles"}, where, "constitution")
    name = obj.get("name", Path(where).stem)
    if not isinstance(name, str):
        raise _err(where, "name", f"must be a string, got {name!r}")
    principles = obj.get("principles")
    if not isinstance(principles, list) or not principles:
        raise _err(where, "principles", "must be a non-empty list of principles")
    out: list[Principle] = []
    for i, p in enumerate(principles):
        field = f"principles[{i}]"
        if not isinstance(p, dict):
            raise _err(where, field, f"must be an object, got {type(p).__name__}")
        _keys(p, {"name", "description", "check", "critique", "revision"}, where, field)
        pname = _text(p, "name", where, field)
        if not _NAME.fullmatch(pname):
            raise _err(where, f"{field}.name", f"{pname!r}: use letters, digits, _ and - only")
        if any(q.name == pname for q in out):
            raise _err(where, f"{field}.name", f"{pname!r} is used twice", fix="give each principle its own name")
        if "check" not in p:
            raise _err(where, field, "missing field 'check'")
        out.append(Principle(pname, _text(p, "description", where, field), _check(p["check"], where, f"{field}.check"),
                             _template(_text(p, "critique", where, field), where, f"{field}.critique"),
                             _template(_text(p, "revision", where, field), where, f"{field}.revision")))
    markers = [p.check.marker.casefold() for p in out if p.check.kind == "refuse_marked"]
    for i, p in enumerate(out):  # a refusal is the revision of every marked request: it must break nothing
        c = p.check
        if c.kind != "refuse_marked":
            continue
        for q in out:
            if q is not p and q.check.kind != "refuse_marked" and q.check.finding(c.marker, c.refusal) is not None:
                raise _err(where, f"principles[{i}].check.refusal", f"{c.refusal!r} breaks principle {q.name!r} "
                           f"({q.check.finding(c.marker, c.refusal)})", fix="write a refusal every principle allows")
        for j, tag in enumerate(c.lookalikes):
            if any(m in tag.casefold() for m in markers):
                raise _err(where, f"principles[{i}].check.lookalikes[{j}]", f"{tag!r} contains another marker")
    return Constitution(name, tuple(out), where)


def load_constitution(path: str | Path = "") -> Constitution:
    """The constitution in a JSON file; "" = the embedded one (`DEFAULT_CONSTITUTION`)."""
    if not path:
        return parse_constitution(DEFAULT_CONSTITUTION, "the embedded constitution")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such constitution file", fix="check --cai.constitution") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder", fix="pass a constitution JSON file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return parse_constitution(obj, str(path))
