"""Text normalisation that defeats the usual ways of hiding a word from a lexicon.

``canonical(text)`` folds case, Unicode look-alikes (Cyrillic, Greek, small capitals, mathematical
and enclosed letters, fullwidth forms), accents and invisible characters into plain lower-case ASCII.
``views(text)`` then returns several readings of that canonical text, so one lexicon match can catch:

* leetspeak (``s3x``, ``pr0n``, ``$ex``, ``n@ked``; ``1`` and ``|`` read both as ``i`` and as ``l``),
* punctuation or spaces inside a word (``n.u.d.e``, ``nu-de``, ``n u d e``),
* a masked letter (``n*de``, ``f#ck``), resolved against the lexicon's own words,
* words spelled out letter by letter and run together (``s e x y t e e n``: see ``letter_runs``),
* punctuation between words (``mickey-mouse`` reads as ``mickey mouse``).

Repeated letters (``nuuuude``) are handled where patterns are compiled (``term_pattern``): each letter
of a term matches one or more copies of itself, so ``boobs`` needs two o's but accepts five.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable

# Look-alikes that NFKC does not fold. Keys are lower case (the text is case-folded first).
_CONFUSABLES = {
    # Cyrillic
    "а": "a", "б": "b", "в": "b", "г": "r", "д": "d", "е": "e", "ё": "e", "ж": "x", "з": "3", "и": "u",
    "й": "u", "к": "k", "л": "n", "м": "m", "н": "h", "о": "o", "п": "n", "р": "p", "с": "c", "т": "t",
    "у": "y", "ф": "f", "х": "x", "ц": "u", "ч": "4", "ш": "w", "щ": "w", "ъ": "b", "ы": "bi", "ь": "b",
    "э": "e", "ю": "io", "я": "r", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "һ": "h", "ԛ": "q",
    "ԝ": "w", "ӏ": "l", "ү": "y", "ұ": "y", "қ": "k", "ң": "h", "ғ": "f", "ә": "e", "ө": "o", "ҽ": "e",
    "ɡ": "g", "ԍ": "g", "ց": "g", "օ": "o", "ս": "u", "ո": "n", "հ": "h", "ք": "p", "ա": "w",
    # Greek
    "α": "a", "β": "b", "γ": "y", "δ": "d", "ε": "e", "ζ": "z", "η": "n", "θ": "o", "ι": "i", "κ": "k",
    "λ": "l", "μ": "u", "ν": "v", "ξ": "e", "ο": "o", "π": "n", "ρ": "p", "σ": "o", "ς": "c", "τ": "t",
    "υ": "u", "φ": "f", "χ": "x", "ψ": "w", "ω": "w", "ϲ": "c", "ϳ": "j", "ϐ": "b", "ϑ": "o", "ϱ": "p",
    "ϵ": "e", "ϝ": "f",
    # Latin small capitals, IPA and other letters without a decomposition
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j",
    "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ǫ": "q", "ʀ": "r", "ꜱ": "s", "ᴛ": "t",
    "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ɑ": "a", "ɓ": "b", "ɔ": "o", "ɛ": "e", "ɩ": "i",
    "ı": "i", "ȷ": "j", "ø": "o", "đ": "d", "ħ": "h", "ł": "l", "ŧ": "t", "ƀ": "b", "ɨ": "i", "ʉ": "u",
    "æ": "ae", "œ": "oe", "ð": "d", "þ": "p", "ŋ": "n", "ɾ": "r", "ʃ": "s", "ʒ": "z", "ǝ": "e", "ə": "e",
    "ɐ": "a", "ɯ": "m", "ɹ": "r", "ʇ": "t", "ʌ": "v", "ʍ": "w", "ʎ": "y", "ɥ": "h", "ɟ": "f", "ƃ": "b",
    "×": "x", "ß": "ss",
}
# Characters that render as nothing (or as blank) but are letters, so NFKC and category filters miss them.
_INVISIBLE = {"\u3164", "\u115f", "\u1160", "\uffa0", "\u2800", "\u180e", "\u034f"}


def _enclosed(cp: int) -> str | None:
    """Negative circled/squared letters and regional indicators (no NFKC decomposition)."""
    for start in (0x1F150, 0x1F170, 0x1F1E6, 0x1F130):
        if start <= cp < start + 26:
            return chr(ord("a") + cp - start)
    return None


_LEET_DIGITS = {"0": "o", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g"}
_LEET_SYMBOLS = {"@": "a", "$": "s", "€": "e", "£": "l", "¢": "c", "¥": "y"}
_LEET_INNER = {"!": "i", "|": "i", "+": "t", "(": "c", "<": "c", "{": "c", "[": "c"}  # only between letters/digits
_MASKS = "*#%?"
_PUNCT = re.compile(r"[^a-z0-9\s]")
_SPACES = re.compile(r"\s+")


def canonical(text: str) -> str:
    """Lower-case ASCII-ish text: look-alikes folded, accents and invisible characters removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for ch in unicodedata.normalize("NFD", text):
        if ch in _INVISIBLE:
            continue
        cat = unicodedata.category(ch)
        if cat in ("Mn", "Me", "Cf", "Cc") and not ch.isspace():
            continue
        mapped = _CONFUSABLES.get(ch)
        if mapped is None and ord(ch) > 0x1F000:
            mapped = _enclosed(ord(ch))
        out.append(mapped if mapped is not None else ch)
    text = unicodedata.normalize("NFKC", "".join(out)).casefold()  # again: a mapping may produce composables
    return _SPACES.sub(" ", text).strip()


def _has_letter(token: str) -> bool:
    return any("a" <= c <= "z" for c in token)


def _leet_token(token: str, one: str) -> str:
    if not _has_letter(token):
        return token
    chars = list(token)
    n = len(chars)
    for i, c in enumerate(chars):
        if c in _LEET_DIGITS:
            chars[i] = _LEET_DIGITS[c]
        elif c in "1":
            chars[i] = one
        elif c in _LEET_SYMBOLS:
            chars[i] = _LEET_SYMBOLS[c]
        elif c in _LEET_INNER and 0 < i < n - 1 and token[i - 1].isalnum() and token[i + 1].isalnum():
            chars[i] = one if c in "!|" else _LEET_INNER[c]
    return "".join(chars)


def _resolve_masks(token: str, words: Callable[[int], Iterable[str]] | None) -> str:
    """``n*de`` -> ``nude`` when exactly one lexicon word of that length fits (masks inside a word only)."""
    if words is None or not any(m in token for m in _MASKS):
        return token
    core = token.strip("".join(_MASKS) + ".,;:!?'\"()[]{}")
    letters = sum(c.isalpha() for c in core)
    masks = sum(c in _MASKS for c in core)
    if masks == 0 or letters < 2 or masks > letters or not all(c.isalpha() or c in _MASKS for c in core):
        return token
    pattern = re.compile("".join("[a-z]" if c in _MASKS else re.escape(c) for c in core))
    fits = sorted({w for w in words(len(core)) if pattern.fullmatch(w)})
    return fits[0] if fits else token


def _merge_singles(tokens: list[str], split_article: bool) -> list[str]:
    """Join runs of two or more one-character tokens: ``s e x`` -> ``sex``. With ``split_article``,
    a run starting with ``a`` or ``i`` keeps that first letter apart (``a n u d e`` -> ``a nude``)."""
    out: list[str] = []
    run: list[str] = []

    def flush():
        if len(run) >= 2:
            if split_article and run[0] in ("a", "i") and len(run) >= 3:
                out.extend([run[0], "".join(run[1:])])
            else:
                out.append("".join(run))
        else:
            out.extend(run)
        run.clear()

    for tok in tokens:
        if len(tok) == 1 and tok.isalnum():
            run.append(tok)
        else:
            flush()
            out.append(tok)
    flush()
    return out


def views(text: str, *, words: Callable[[int], Iterable[str]] | None = None) -> list[str]:
    """Readings of ``text`` to match a lexicon against (canonical, leet as i, leet as l; punctuation as
    a space and punctuation deleted; runs of single letters joined). ``words(n)`` lists the lexicon's
    words of length n, for resolving masked letters."""
    base = canonical(text)
    raw_tokens = base.split()
    seen: dict[str, None] = {}
    for one in (None, "i", "l"):
        tokens = raw_tokens if one is None else [_leet_token(t, one) for t in raw_tokens]
        tokens = [_resolve_masks(t, words) for t in tokens]
        joined = " ".join(tokens)
        for punct in (" ", ""):
            stripped = _SPACES.sub(" ", _PUNCT.sub(punct, joined)).strip()
            parts = stripped.split()
            for split_article in (False, True):
                merged = _merge_singles(parts, split_article)
                if one is not None:
                    merged = [_leet_token(t, one) for t in merged]
                seen.setdefault(" ".join(merged))
    return list(seen)


def letter_runs(text: str, *, minimum: int = 4) -> list[str]:
    """Words spelled out one letter at a time, joined (``s e x y t e e n`` -> ``sexyteen``), in each leet
    reading. Such a run is deliberate, so a lexicon term may be looked for anywhere inside it."""
    out: dict[str, None] = {}
    base = canonical(text)
    for one in (None, "i", "l"):
        tokens = base.split() if one is None else [_leet_token(t, one) for t in base.split()]
        parts = _SPACES.sub(" ", _PUNCT.sub(" ", " ".join(tokens))).split()
        run: list[str] = []
        for tok in parts + [""]:
            if len(tok) == 1 and tok.isalnum():
                run.append(tok)
                continue
            if len(run) >= minimum:
                merged = "".join(run)
                out.setdefault(merged if one is None else _leet_token(merged, one))
            run = []
    return list(out)


def word_view(text: str) -> str:
    """One plain reading: canonical, leetspeak as ``i``, punctuation as spaces, single letters joined."""
    tokens = [_leet_token(t, "i") for t in canonical(text).split()]
    parts = _SPACES.sub(" ", _PUNCT.sub(" ", " ".join(tokens))).split()
    return " ".join(_leet_token(t, "i") for t in _merge_singles(parts, False))


def term_pattern(term: str) -> str:
    """Regex source for one lexicon term (no boundaries).

    Syntax: words separated by spaces match with or without a space between them; a trailing ``*``
    matches any continuation of the last word; otherwise a plural ``s``/``es`` may follow; a leading
    ``=`` means the word exactly (no plural); ``re:`` starts a raw regular expression.
    Each letter matches one or more copies of itself (a doubled letter needs at least two).
    """
    if term.startswith("re:"):
        return term[3:]
    exact = term.startswith("=")
    term = term.lstrip("=").strip().lower()
    prefix = term.endswith("*")
    term = term.rstrip("*").strip()
    words = []
    for word in term.split():
        pieces = []
        for m in re.finditer(r"(.)\1*", word):
            char, count = m.group(1), len(m.group(0))
            esc = re.escape(char)
            if char.isalpha():
                pieces.append(f"{esc}+" if count == 1 else f"{esc}{{{count},}}")
            else:
                pieces.append(esc * count)
        words.append("".join(pieces))
    body = " ?".join(words)
    if prefix:
        return body + "[a-z]*"
    if exact:
        return body
    return body + "(?:e?s)?"


def bounded(source: str) -> str:
    return rf"(?<![a-z])(?:{source})(?![a-z])"
