"""Target words -> token positions, for Attention Regulation (Zhang et al., ECCV 2024, arXiv 2403.06381) and
Attend-and-Excite (Chefer et al., SIGGRAPH 2023). Both edit the cross-attention columns of chosen prompt tokens,
so a word has to become positions in the 77-long sequence that the text encoder reads.

The released Attention Regulation code takes, per sub-token of a target, its first occurrence in the prompt.
Here a word maps to ALL its sub-token positions, a repeated word can be picked by occurrence ("dog#2"), a
match must start at a word boundary, and an unknown word is an error that prints the prompt's token table.
"""
import re
from dataclasses import dataclass
from functools import lru_cache


class TargetError(ValueError):
    """A target word that is not in the prompt (or not that many times)."""


@dataclass
class Target:
    word: str              # as asked, e.g. "dog#2"
    positions: list        # positions in the 77-long sequence, never 0 (the start token)
    tokens: list           # the token text at each position, e.g. ["humming", "bird</w>"]


def parse_target(spec):
    """"dog#2" -> ("dog", 2); "dog" -> ("dog", 1)."""
    word, sep, n = spec.strip().rpartition("#")
    if not sep or not word:
        return spec.strip(), 1
    if not n.isdigit() or int(n) < 1:
        raise TargetError(f"target {spec!r}: the occurrence after '#' must be a number >= 1, e.g. 'dog#2'")
    return word.strip(), int(n)


def _tokenizers(tokenizer):
    """One tokenizer, or a list of them (SDXL's two)."""
    return list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]


def eot_position(tokenizer, prompt):
    """Position of the first end-of-text token. With SD 2.x zero padding it is the only one. With several
    tokenizers (SDXL), that of the first; resolve_targets checks that they agree."""
    tokenizer = _tokenizers(tokenizer)[0]
    return tokenizer.ids(prompt).index(tokenizer.eos_id)


def resolve_targets(tokenizer, prompt, words):
    """`tokenizer` may be a list (SDXL: one per text encoder, padded differently): the words are resolved with
    each, and the positions must agree, since one attention column is the same token for both encoders."""
    toks = _tokenizers(tokenizer)
    targets = _resolve(toks[0], prompt, words)
    for i, tok in enumerate(toks[1:], start=2):
        other = _resolve(tok, prompt, words)
        if [t.positions for t in other] != [t.positions for t in targets] or \
                eot_position(tok, prompt) != eot_position(toks[0], prompt):
            raise TargetError(f"tokenizer {i} puts the targets at {[t.positions for t in other]}, tokenizer 1 at "
                              f"{[t.positions for t in targets]}: their token positions must agree")
    return targets


def _resolve(tokenizer, prompt, words):
    """Map each target word to all of its sub-token positions in the prompt's 77 positions.

    words: a list like ["cat", "dog#2"] (a single string is split on whitespace). Matching is
    case-insensitive (the tokenizer lowercases) and compares the word's token sequence with the prompt's,
    starting at a word boundary, so "bird" does not match the tail of "hummingbird". A repeated word takes
    its first occurrence unless asked for another one with "#n" ("dog#2" = the second "dog").
    A phrase ("teddy bear") works too: its tokens must appear consecutively.
    Raises TargetError, with the prompt's token table, for a word that is not there."""
    if isinstance(words, str):
        words = words.split()
    ids = tokenizer.ids(prompt)
    end = ids.index(tokenizer.eos_id)
    targets, seen = [], {}
    for spec in words:
        word, occurrence = parse_target(spec)
        seq = tokenizer.encode(word)
        if not seq:
            raise TargetError(f"target {spec!r} has no tokens")
        starts = [p for p in range(1, end - len(seq) + 1)
                  if ids[p:p + len(seq)] == seq and (p == 1 or tokenizer.decoder[ids[p - 1]].endswith("</w>"))]
        if len(starts) < occurrence:
            found = f"it occurs {len(starts)} time(s)" if starts else "it is not in the prompt"
            raise TargetError(f"target {spec!r}: {found} (positions 1..{end - 1} are the prompt's tokens).\n"
                              + token_table(tokenizer, prompt))
        positions = list(range(starts[occurrence - 1], starts[occurrence - 1] + len(seq)))
        if tuple(positions) in seen:
            raise TargetError(f"targets {seen[tuple(positions)]!r} and {spec!r} are the same tokens {positions}")
        seen[tuple(positions)] = spec
        targets.append(Target(spec, positions, [tokenizer.token_text(ids[p]) for p in positions]))
    return targets


def token_table(tokenizer, prompt, targets=None):
    """A printable table: position, token, word. With targets, only their rows (word = the target as asked);
    without, every position from the start token to the first end-of-text token."""
    tokenizer = _tokenizers(tokenizer)[0]
    ids = tokenizer.ids(prompt)
    if targets is not None:
        rows = [(p, tokenizer.token_text(ids[p]), t.word) for t in targets for p in t.positions]
    else:
        end = ids.index(tokenizer.eos_id)
        rows, word_start = [], 1
        for p in range(end + 1):
            if p in (0, end):
                rows.append((p, tokenizer.token_text(ids[p]), ""))
                continue
            if tokenizer.decoder[ids[p]].endswith("</w>"):  # a word ends here: label all its sub-tokens
                word = tokenizer.decode(ids[word_start:p + 1])
                rows += [(q, tokenizer.token_text(ids[q]), word) for q in range(word_start, p + 1)]
                word_start = p + 1
    width = max([len("token")] + [len(t) for _, t, _ in rows])
    lines = [f"{'pos':>3}  {'token':<{width}}  word"]
    lines += [f"{p:>3}  {t:<{width}}  {w}" for p, t, w in rows]
    return "\n".join(lines)


# --- automatic choice of targets --------------------------------------------------------------------------
# No language model: a noun phrase's head noun in English is (nearly always) its last word, so cut the prompt
# into phrases at the words that join phrases and keep each phrase's last word. Small built-in word lists.

FRAME_NOUNS = {"photo", "photograph", "image", "picture", "painting", "drawing", "illustration", "sketch",
               "render", "rendering", "closeup", "close-up", "portrait", "cartoon", "watercolor", "shot", "view",
               "artwork", "scene"}
SEPARATORS = {  # conjunctions, prepositions, relation nouns ("in front of", "to the left of"), common verbs
    "and", "or", "but", "while", "with", "without", "on", "of", "in", "at", "under", "over", "above", "below",
    "beneath", "behind", "beside", "besides", "near", "by", "next", "to", "into", "onto", "inside", "outside",
    "from", "for", "against", "between", "around", "across", "through", "along", "atop", "underneath", "like",
    "front", "top", "left", "right", "side", "middle", "center", "bottom", "back",
    "is", "are", "was", "were", "be", "has", "have", "that", "which", "who", "what", "where", "there",
    "holds", "wears", "sits", "stands", "eats", "plays", "looks", "rides", "lies", "hangs", "contains",
    "features", "shows", "sat", "stood", "held", "lay", "ran", "flew", "wore", "rode", "ate", "made",
    "it", "them", "they", "he", "she", "him", "itself"}
DETERMINERS = {"a", "an", "the", "this", "these", "those", "some", "many", "several", "few", "each",
               "every", "another", "other", "no", "its", "his", "her", "their", "my", "your", "our", "one", "two",
               "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single", "pair", "couple",
               "group", "bunch", "lot", "lots", "very", "also"}
COLOURS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
           "grey", "gold", "golden", "silver", "cyan", "magenta", "violet", "beige", "turquoise", "colorful",
           "colourful", "dark", "light", "bright", "pale"}
ADJECTIVES = {"big", "small", "large", "tiny", "huge", "little", "tall", "short", "long", "wide", "narrow",
              "round", "old", "new", "young", "cute", "pretty", "ugly", "happy", "sad", "angry", "clean",
              "fluffy", "furry", "wooden", "metal", "metallic", "plastic", "glass", "shiny", "soft", "hard",
              "wet", "dry", "hot", "cold", "warm", "fat", "thin", "empty", "full", "open", "closed", "broken",
              "realistic", "detailed", "beautiful", "cozy", "modern", "vintage", "ancient", "giant", "fuzzy",
              "striped", "spotted", "checkered", "plaid", "rough", "smooth", "sleek", "fresh", "rusty", "tidy",
              "elegant", "glossy", "fiery", "delicate", "lush", "clear"}
ADJECTIVE_SUFFIXES = ("ful", "ous", "less", "ish")
NOT_OBJECTS = {"art", "style", "artstation", "4k", "8k", "hd", "uhd", "quality", "resolution", "lighting",
               "background", "photography", "detail", "details", "colors", "colours"}
PARTICIPLE_NOUNS = {"building", "painting", "ring", "king", "wing", "string", "thing", "ceiling", "clothing",
                    "pudding", "dumpling", "swing", "spring", "sling", "earring", "railing", "stocking", "wedding",
                    "steed", "tweed", "seaweed"}


def is_adjective(word):
    return word in COLOURS or word in ADJECTIVES or (word.endswith(ADJECTIVE_SUFFIXES) and len(word) > 6)


def is_modifier(word):
    """Words that never head a noun phrase: articles, numbers, -ly adverbs (not "lily", "jelly": length > 5)."""
    return word in DETERMINERS or word.isdigit() or (word.endswith("ly") and len(word) > 5)


def is_boundary(word, next_word):
    """Does `word` end the current noun phrase? A participle (-ing/-ed) is a verb there ("a dog sitting on a
    bench", "a bowl filled with rice") when what follows is not a noun, and a modifier before a noun
    ("a dining table", "a stuffed bear")."""
    if word in SEPARATORS or not re.match(r"[^\W_]", word):
        return True
    participle = word.endswith(("ing", "ed")) and len(word) > 4 and word not in PARTICIPLE_NOUNS
    return participle and (next_word in SEPARATORS or is_modifier(next_word) or not re.match(r"[^\W_]", next_word))


def phrase_head(phrase):
    """The head noun of one phrase, or None. Adjectives come before the noun in English, so the head is the
    last word. A colour or adjective can head a phrase ("a traffic light", "an orange"), but alone with no
    article it is a predicate ("the car is red"): no head. "digital art", "4k": not objects."""
    content = [w for w in phrase if not is_modifier(w)]
    predicate = len(content) == 1 and is_adjective(content[0]) and not any(w in DETERMINERS for w in phrase)
    if not content or predicate or content[-1] in NOT_OBJECTS:
        return None
    return content[-1]


def auto_targets(prompt):
    """Choose the objects of a prompt, with no language model. The rule:
    1. lowercase, drop possessive 's, and drop a framing prefix: everything up to "<photo|image|painting|...>
       of" within the first six words ("a photo of", "an oil painting of");
    2. cut into phrases at punctuation, conjunctions, prepositions (so also "next to", "in front of",
       "to the left of"), common verbs, and -ing/-ed participles not followed by a noun; but a run of
       adjectives joined by "and" or "," ("a black and white cat", "the soft, fluffy towel") is not cut;
    3. in each phrase drop articles, numbers and -ly adverbs and keep the last word: the head noun
       (see phrase_head for adjectives and style words such as "digital art").
    A word chosen twice is returned as "cat", "cat#2" (see resolve_targets)."""
    text = re.sub(r"['\u2019]s\b", "", prompt.lower())
    words = re.findall(r"[^\W_]+(?:-[^\W_]+)*|[^\w\s]", text)
    for i, w in enumerate(words[:6]):
        if w in FRAME_NOUNS and words[i + 1:i + 2] == ["of"]:
            words = words[i + 2:]
            break
    words.append(".")
    heads, phrase = [], []
    for i, w in enumerate(words[:-1] + ["."]):
        nxt = words[i + 1] if i + 1 < len(words) else "."
        adjectives_so_far = phrase and all(is_modifier(x) or is_adjective(x) for x in phrase) \
            and any(is_adjective(x) for x in phrase)
        if w in ("and", ",") and adjectives_so_far and is_adjective(nxt):
            continue  # "a black and white cat": one phrase
        if is_boundary(w, nxt):
            head = phrase_head(phrase)
            if head:
                heads.append(head)
            phrase = []
        else:
            phrase.append(w)
    counts, out = {}, []
    for h in heads:
        counts[h] = counts.get(h, 0) + 1
        out.append(h if counts[h] == 1 else f"{h}#{counts[h]}")
    return out


# --- modifier-noun pairs (SynGen) -------------------------------------------------------------------------
# SynGen (regulation/syngen.py) binds each noun to its modifiers. The authors parse the prompt with spaCy and
# keep each noun's amod/compound/advmod/... dependents; the rules below read the same pairs off the noun phrases
# that auto_targets cuts, since English modifiers come before their noun. spaCy is used where it is installed
# and asked for.

COPULAS = {"is", "are", "was", "were", "be", "being", "been", "looks", "seems"}
ARTICLES = {"a", "an", "the"}


def _atoms(text):
    """CLIP's pre-tokens, roughly: letter runs, single digits, runs of other non-space characters. A word's
    tokens start at one of these, which is where resolve_targets lets a match start."""
    return re.findall(r"[^\W\d_]+|\d|(?:[^\w\s]|_)+", text)


def _spec(text, start, word):
    """`word` found at character `start` of the lowercased prompt `text` -> "word" or "word#n", the n-th match
    as resolve_targets counts matches (matches of its pre-token sequence, earlier ones first)."""
    seq, before = _atoms(word), _atoms(text[:start])
    n = 1 + sum(before[p:p + len(seq)] == seq for p in range(len(before) - len(seq) + 1))
    return word if n == 1 else f"{word}#{n}"


def _rule_pairs(prompt):
    """(modifier (word, start) list, (noun, start)) per noun phrase; the auto_targets cut (see there), and an
    article after a phrase's words also cuts it, dropping the word before the article: a verb or preposition
    the word lists lack ("two dogs chase a ball")."""
    # possessive 's ends a phrase ("the cat's red hat": "cat", then "red hat"); same length, so offsets hold
    text = re.sub(r"['\u2019]s\b", " ,", prompt.lower())
    found = [(m.group(), m.start()) for m in re.finditer(r"[^\W_]+(?:-[^\W_]+)*|[^\w\s]", text)]
    words = [w for w, _ in found]
    first = 0
    for i, w in enumerate(words[:6]):
        if w in FRAME_NOUNS and words[i + 1:i + 2] == ["of"]:
            first = i + 2
            break
    found = found[first:] + [(".", len(text))]
    pairs, phrase, joiner = [], [], None

    def close(phrase, joiner):
        said = [x for x, _ in phrase]
        content = [(x, s) for x, s in phrase if x not in DETERMINERS and not x.isdigit()]
        if content and joiner in COPULAS and pairs and not ARTICLES & set(said) \
                and all(is_adjective(x) or is_modifier(x) for x, _ in content):
            pairs[-1][0].extend(content)          # "the car is red": a predicate of the last noun
            return
        head = phrase_head(said)
        if head:
            k = max(j for j, (x, _) in enumerate(phrase) if x == head)
            pairs.append(([(x, s) for x, s in phrase[:k] if (x, s) in content], phrase[k]))

    for i, (w, start) in enumerate(found):
        nxt = found[i + 1][0] if i + 1 < len(found) else "."
        said = [x for x, _ in phrase]
        adjectives_so_far = said and all(is_modifier(x) or is_adjective(x) for x in said) \
            and any(is_adjective(x) for x in said)
        if w in ("and", ",") and adjectives_so_far and is_adjective(nxt):
            continue  # "a red and blue table": one phrase
        if w in ARTICLES and any(x not in DETERMINERS and not x.isdigit() for x in said):
            close(phrase[:-1], joiner)
            phrase, joiner = [(w, start)], said[-1]
        elif not is_boundary(w, nxt):
            phrase.append((w, start))
        else:
            close(phrase, joiner)
            phrase, joiner = [], w
    return text, pairs


MODIFIER_DEPS = ("amod", "nmod", "compound", "npadvmod", "advmod", "acomp")   # the authors' list
NOUN_TAGS = ("NOUN", "PROPN")


def spacy_pairs(doc):
    """(modifier tokens, noun token) from a spaCy Doc (or anything with tokens carrying .pos_, .dep_, .children):
    the authors' rule (their extract_attribution_indices): for each noun that is not itself a modifier, its
    children with a modifier dependency, then their descendants through modifier or `conj` arcs; nouns without
    modifiers get an empty list. Plus their copula rule (extract_attribution_indices_with_verb_root, "the car is
    red"): an AUX whose children include a noun and a modifier binds them (modifiers of a noun already seen are
    added to it, where the authors merge overlapping groups and then take the group's last word as the noun)."""
    out = {}
    for w in doc:
        if w.pos_ not in NOUN_TAGS or w.dep_ in MODIFIER_DEPS:
            continue
        mods, stack = [], []
        for child in w.children:
            if child.dep_ in MODIFIER_DEPS:
                mods.append(child)
                stack.extend(child.children)
        while stack:
            node = stack.pop()
            if node.dep_ in MODIFIER_DEPS or node.dep_ == "conj":
                mods.append(node)
                stack.extend(node.children)
        out[w.i] = (mods, w)
    for w in doc:
        if w.pos_ != "AUX" or w.dep_ in MODIFIER_DEPS:
            continue
        nouns = [c for c in w.children if c.pos_ in NOUN_TAGS and c.i in out]
        mods, stack = [], []
        for child in w.children:
            if child.dep_ in MODIFIER_DEPS and child.pos_ not in ("AUX", "VERB") and child.pos_ not in NOUN_TAGS:
                mods.append(child)
                stack.extend(child.children)
        while stack:
            node = stack.pop()
            if node.dep_ in MODIFIER_DEPS or node.dep_ == "conj":
                if node.pos_ != "AUX":
                    mods.append(node)
                stack.extend(node.children)
        if nouns and mods:
            known = {m.i for m in out[nouns[0].i][0]}
            out[nouns[0].i][0].extend(m for m in mods if m.i not in known)
    return [(sorted(mods, key=lambda t: t.i), noun) for _, (mods, noun) in sorted(out.items())]


@lru_cache(maxsize=1)
def load_spacy():
    """spaCy's English parser, the authors' en_core_web_trf or else en_core_web_sm, loaded once; ImportError if
    neither is installed (the models come from spaCy's own site, not from a package registry)."""
    try:
        import spacy
    except ImportError as e:
        raise ImportError("parser='spacy' needs spaCy and an English model (en_core_web_trf or en_core_web_sm); "
                          "use parser='rules'") from e
    for name in ("en_core_web_trf", "en_core_web_sm"):
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise ImportError("spaCy is installed but neither en_core_web_trf nor en_core_web_sm is; use parser='rules'")


def modifier_noun_pairs(prompt, parser="rules"):
    """The nouns of a prompt with their modifiers: [(modifier words, noun word)], in prompt order, e.g.
    "a small fluffy cat on a wooden table" -> [(["small", "fluffy"], "cat"), (["wooden"], "table")]. Nouns with
    no modifier come with an empty list. Words are lowercased, and one that occurs earlier in the prompt too is
    named by occurrence ("red#2", see resolve_targets), so each resolves to its own tokens.

    parser="rules" (no language model): auto_targets' noun phrases (same cuts, same head noun); a phrase's
    modifiers are its words before the noun other than articles and numbers: adjectives, colours, -ly adverbs,
    participles and nouns used as modifiers ("a teddy bear": teddy, as spaCy's `compound`); adjectives alone
    after a copula attach to the noun before ("a dog that is red"). parser="spacy": spacy_pairs on spaCy's
    parse (load_spacy)."""
    if parser == "rules":
        text, found = _rule_pairs(prompt)
        return [([_spec(text, s, m) for m, s in mods], _spec(text, start, noun)) for mods, (noun, start) in found]
    if parser == "spacy":
        text = prompt.lower()
        return [([_spec(text, m.idx, m.text.lower()) for m in mods], _spec(text, noun.idx, noun.text.lower()))
                for mods, noun in spacy_pairs(load_spacy()(prompt))]
    raise ValueError(f"parser must be 'rules' or 'spacy', got {parser!r}")
