"""The rule-based summarizer of prepare/summarize.py (backend "rules", the offline default).

Stands in for the paper's GPT-4o semantic summarization: sentence split -> clause split -> negation
detection -> every positive finding of the 18 CT-RATE classes becomes one short sentence that
contains the class name (with side, location and severity qualifiers); other positive findings are
kept as shortened clauses; normal statements and measurements are dropped. Deterministic, standard
library only.

    python -c "import prepare.summarize_rules"   # a library; prepare/summarize.py is the command line
"""
import re

CLASSES = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
NO_FINDING = "No significant abnormality."

# ---------------------------------------------------------------------------------------------------
# Sentence and clause splitting
# ---------------------------------------------------------------------------------------------------

# A period after these does not end a sentence ("e.g. nodules", "approx. 5 mm").
_ABBREVIATIONS = {"e.g", "i.e", "eg", "ie", "vs", "approx", "dr", "fig", "no", "nr", "cf", "etc", "st"}
_LIST_MARKER = re.compile(r"(^|[\n.:;!?]\s*)\(?\d{1,2}[.)]\s+(?=\S)")
_HARD_BREAK = re.compile(r"\n+|\"+|[•·▪●]|\s-\s(?=[A-Z])|;\s*|:\s+(?=[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Split a report into sentences: newlines, quotes (CT-RATE's separator), bullets, numbered
    lists, semicolons and sentence punctuation; decimals, "e.g." and "5 mm. nodule" do not split."""
    text = _LIST_MARKER.sub(lambda m: m.group(1) + "\n", text)
    out = []
    for chunk in _HARD_BREAK.split(text):
        pieces = re.split(r"(?<=[.!?])\s+", chunk.strip())
        merged: list[str] = []
        for piece in pieces:
            if not piece:
                continue
            prev_word = merged[-1].rsplit(None, 1)[-1].rstrip(".").lower() if merged else ""
            # A lower-case start or a non-terminal abbreviation means the period did not end a sentence.
            if merged and (piece[0].islower() or prev_word in _ABBREVIATIONS):
                merged[-1] += " " + piece
            else:
                merged.append(piece)
        out += [s.strip(" ,.-") for s in merged if re.search(r"[A-Za-z]{2}", s)]
    return out


# A clause break: "but", "however", "whereas", ... always; "and" / "," only between two full
# clauses (each with a verb), so "Pleural effusion and atelectasis were not observed" stays whole.
_STRONG_BREAK = re.compile(r",?\s+\b(?:but|however|whereas|while|although|though|except|apart from|"
                           r"other than|besides)\b\s*,?", re.I)
_WEAK_BREAK = re.compile(r",\s*(?:and\s+)?|\s+and\s+(?=(?:no|there|the|a|an|it|is|are)\b)", re.I)
_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|be|been|observed|seen|detected|noted|"
                   r"identified|present|shows?|showed|appears?|appeared|reveals?|remains?)\b", re.I)


def split_clauses(sentence: str) -> list[str]:
    clauses = []
    for part in _STRONG_BREAK.split(sentence):
        pieces = _WEAK_BREAK.split(part)
        current = pieces[0]
        for piece in pieces[1:]:
            if _VERB.search(current) and _VERB.search(piece):
                clauses.append(current)
                current = piece
            else:
                current += ", " + piece
        clauses.append(current)
    return [c.strip(" ,") for c in clauses if c.strip(" ,")]


# ---------------------------------------------------------------------------------------------------
# Negation
# ---------------------------------------------------------------------------------------------------

# Phrases that contain a negation word but do not negate a finding ("no change in the nodule").
_PSEUDO_NEG = re.compile(
    r"\bno (?:significant |marked |obvious |apparent )?(?:change|progression|regression|difference)s?\b|"
    r"\bnot (?:only|be (?:evaluated|assessed))\b|"
    r"\b(?:can ?not|could not|cannot) be (?:ruled out|excluded|distinguished|differentiated)\b|"
    r"\bcould not be (?:evaluated|assessed)(?: optimally)?\b|\b(?:did )?not reach(?:ing)?\b", re.I)
# Negation before the finding; its scope runs to the end of the clause.
_PRE_NEG = re.compile(r"\b(?:no|not|without|free of|negative for|absence of|neither|nor|none|"
                      r"rule out|lack of)\b", re.I)
# Negation or normality after the finding; its scope runs back to the start of the clause.
_POST_NEG = re.compile(
    r"\b(?:(?:is|are|was|were|be|been|has|have)\s+)*not\s+(?:been\s+)?(?:\w+ly\s+)?"
    r"(?:observed|seen|detected|noted|identified|visuali[sz]ed|present|found|determined|"
    r"demonstrated|evident|apparent|monitored|encountered|appreciated|distinguished|shown|selected|"
    r"thickened|enlarged|dilated|calcified|increased)\b|"
    r"\b(?:ruled out|excluded|absent|resolved|disappeared|within normal limits|unremarkable|"
    r"(?:completely|totally) regressed|no longer (?:\w+ )?(?:seen|observed|detected|present|visible))\b|"
    r"\b(?:is|are|was|were|appears?|appeared|remains?|looks?)\s+(?:\w+\s+)?(?:normal|natural)\b",
    re.I)


def _negated_spans(clause: str) -> list[tuple[int, int]]:
    """Character ranges of the clause that are under a negation (pseudo-negations removed first)."""
    masked = _PSEUDO_NEG.sub(lambda m: "_" * len(m.group(0)), clause)
    spans = [(m.start(), len(clause)) for m in _PRE_NEG.finditer(masked)]
    spans += [(0, m.end()) for m in _POST_NEG.finditer(masked)]
    return spans


# ---------------------------------------------------------------------------------------------------
# Finding vocabulary: synonyms of the 18 classes
# ---------------------------------------------------------------------------------------------------

_TH = r"(?:thicken\w*|thickness\w*|wall thickness\w*)"
_DEVICE = (r"pacemakers?|defibrillators?|stents?|catheters?|cannulas?|cannulae|prosthe(?:sis|ses|tic)|"
           r"(?:breast|silicone|prosthetic|cochlear|dental) implants?|ports?|port-a-cath|"
           r"sternotomy(?: wires?)?|sternal wires?|cerclage wires?|clips?|sutures?|staples?|"
           r"(?:nasogastric|endotracheal|tracheostomy|chest|drainage|feeding|"
           r"thoracostomy|gastrostomy) tubes?|tracheostomy|drains?|coils?|screws?|electrodes?|leads?|"
           r"grafts?|valve replacement|medical material|foreign body|fixation material|osteosynthesis|"
           r"cabg|(?:metallic|surgical|radiopaque) (?:material|density|densities|artifacts?|objects?)")
_NON_LUNG = r"thyroid|liver|hepatic|adrenal|kidney|renal|spleen|splenic|breast|pancrea|bone|vertebra|gland"
# (class, finding pattern, clause must also match (or None), clause must not match (or None))
_VOCAB = [
    ("Medical material", rf"\b(?:{_DEVICE})\b", None, None),
    ("Arterial wall calcification", r"calcif\w*|atherom\w*|atheroscleros\w*|atherosclerotic|plaques?",
     r"aort|arch\b|arter(?:y|ies|ial)|vascular|vessels?|carotid|subclavian|brachiocephalic|iliac|"
     r"atherom|atheroscl", None),
    ("Cardiomegaly", r"cardiomegal\w*|(?:enlarged|increased|large) (?:heart|cardiac)\w*|"
     r"(?:heart|cardiac) (?:size|dimensions?|contours?|volume|silhouette)?\s*(?:\w+\s+){0,2}"
     r"(?:increased|enlarged|larger than normal)|(?:cardiothoracic ratio|ctr)\s+(?:\w+\s+){0,2}increased|"
     r"increase in (?:heart|cardiac) (?:size|dimensions?|volume)", None, None),
    ("Cardiomegaly", r"cardio-?thoracic (?:ratio|index)|\bctr\b", r"increas|enlarg|above|high", None),
    ("Pericardial effusion", r"pericardial (?:\w+[- ])?(?:effusion|fluid)|hemopericardium", None, None),
    # a bare "effusion" or "fluid" belongs to the pericardium when the clause places it there
    ("Pericardial effusion", r"\b(?:effusion|fluid)\b", r"pericard", r"pleural (?:effusion|fluid)"),
    ("Coronary artery wall calcification", r"coronar\w*", r"calcif|atherom|atheroscl|plaque", None),
    ("Hiatal hernia", r"hiat(?:al|us) hern\w*|hernia\w* (?:\w+ ){0,4}hiatus|paraesophageal hernia",
     None, None),
    ("Lymphadenopathy", r"lymphadenopath\w*|adenopath\w*|\blap\b|lymph nodes?|lymphoma\w*",
     None, r"intrapulmonary|subpleural|fissur|intraparenchymal|perifissural"),
    ("Emphysema", r"emphysem\w*|bullae?\b|bullous|blebs?", None, None),
    ("Atelectasis", r"(?<!fibro)atelecta\w*|dystelecta\w*|(?:lobar|lung|lobe) collapse|collapsed",
     None, None),
    # "nodular" alone describes the shape of another finding ("nodular consolidation"), not a nodule
    ("Lung nodule", r"micronodul\w*|nodules?\b|nodular (?:lesion|formation|pattern|densit\w*|appearance)s?",
     None, _NON_LUNG + r"|hypodense|mediastin|mesenter|goit"),
    ("Lung opacity", r"ground[- ]?glass(?![- ](?:density )?nodul)|(?<!nodular )(?:opacit(?:y|ies)|"
     r"infiltrat\w*)", None, _NON_LUNG + r"|sequel|fibro"),
    # "density increase" is opacity only when no other class explains it (fibrosis, atelectasis, ...)
    ("Lung opacity", r"(?:density|densities|attenuation) increases?|increased? (?:density|densities|"
     r"attenuation)|increases? in density|dependent densit\w*", None,
     _NON_LUNG + r"|sequel|fibro|fat|mediastin|pleuroparenchymal|soft tissue|subcutaneous"),
    ("Pulmonary fibrotic sequela", r"sequel\w*|fibro(?:tic|sis|us)\w*|fibroatelecta\w*|"
     r"(?:parenchymal|fibrotic|linear|pleuroparenchymal) bands?|\bscar\w*|band(?:-like)? (?:densit|"
     r"appear|formation)\w*", None, None),
    ("Pleural effusion", r"pleural (?:effusion|fluid)|hydrothorax|hydro-?pn\w*thorax", None, None),
    ("Pleural effusion", r"(?:fluid|effusion) (?:\w+ ){0,6}(?:pleural|hemithorax)\w*", None, r"pericard"),
    ("Pleural effusion", r"(?<!-)\beffusions?\b", None, r"pericard|abdom|periton|joint|ascit"),
    ("Mosaic attenuation pattern", r"mosaic\w*", None, None),
    ("Peribronchial thickening", rf"peribronch\w* (?:\w+ ){{0,2}}{_TH}|{_TH} (?:\w+ ){{0,4}}peribronch\w*|"
     rf"bronch(?:ial|us|i) walls? (?:\w+ )?{_TH}|{_TH} (?:of|in) the (?:peri)?bronch\w*|bronchial {_TH}",
     None, None),
    ("Consolidation", r"consolidat\w*", None, None),
    ("Bronchiectasis", r"bronchiecta\w*|(?:dilated|dilatation (?:of|in) the) bronch\w*|"
     r"bronchial dilat\w*", None, None),
    ("Interlobular septal thickening", rf"septa\w* (?:\w+ ){{0,3}}{_TH}|"
     rf"{_TH} (?:of|in) (?:the )?(?:\w+ ){{0,2}}"
     r"septa\w*|interlob\w* septa\w* (?:\w+ ){0,2}(?:prominen\w*|clarification)|"
     r"prominen\w* (?:\w+ ){0,4}interlob\w* septa", None, None),
]
_VOCAB = [(c, re.compile(p, re.I), re.compile(n, re.I) if n else None, re.compile(x, re.I) if x else None)
          for c, p, n, x in _VOCAB]


# One pass over the clause tells whether any class term occurs at all; most clauses have none.
_ANY_TERM = re.compile("|".join(f"(?:{p.pattern})" for _, p, _, _ in _VOCAB), re.I)


def _clause_findings(clause: str) -> list[tuple[str, re.Match]]:
    """Positive (non-negated) class mentions in one clause, as (class, match) in text order."""
    if not _ANY_TERM.search(clause):
        return []
    negated = _negated_spans(clause)
    found = []
    for name, pattern, need, exclude in _VOCAB:
        if not pattern.search(clause) or (exclude and exclude.search(clause)):
            continue
        # the context word must itself be positive: "coronary arteries show no calcification"
        context = _strip_coronary(clause) if name.startswith("Arterial") else clause
        if need and all(any(a <= m.start() < b for a, b in negated) for m in need.finditer(context)):
            continue
        for m in pattern.finditer(clause):
            if not any(a <= m.start() < b for a, b in negated):
                found.append((name, m))
                break
    return sorted(found, key=lambda f: f[1].start())


def _strip_coronary(clause: str) -> str:
    # "Calcific plaques in the coronary arteries" is coronary only; atheroma words count for the aorta
    # only when the clause names no coronary artery at all.
    if re.search(r"coronar", clause, re.I):
        return re.sub(r"coronar\w*(?: arter\w*)?|atherom\w*|atheroscl\w*", lambda m: " " * len(m.group(0)),
                      clause, flags=re.I)  # same length, so that negation offsets still apply
    return clause


# ---------------------------------------------------------------------------------------------------
# Rendering one finding as a short sentence that contains its class name
# ---------------------------------------------------------------------------------------------------

_SEVERITY = re.compile(
    r"\b(minimal|mild|slight|moderate|severe|marked|extensive|massive|small|large|millimetric|"
    r"subcentimetric|multiple|several|a few|diffuse|focal|patchy|scattered|linear|subsegmental|"
    r"plate-like|centrilobular|centriacinar|paraseptal|panacinar|bullous|traction(?:al)?|calcified|"
    r"cylindrical|varicose|cystic)\b", re.I)
_LOBE = re.compile(r"\b(upper|middle|lower) (?:lobes?|zones?)|\b(lingula)\w*|\b(apex|apices|apical)\b|"
                   r"\b(bases|basal|basals)\b", re.I)
_STATION = re.compile(r"\b(mediastin\w*|hilar|hilum|axillary|paratracheal|subcarinal|supraclavicular|"
                      r"prevascular|aortopulmonary|paraesophageal|cervical|abdominal)\b", re.I)
_VESSEL = re.compile(r"\b(aortic arch|ascending aorta|descending aorta|abdominal aorta|thoracic aorta|"
                     r"aorta|aortic|carotid\w*|subclavian|brachiocephalic|iliac)\b", re.I)
_LUNG_CLASSES = {"Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
                 "Pleural effusion", "Consolidation", "Bronchiectasis", "Emphysema",
                 "Interlobular septal thickening", "Peribronchial thickening", "Mosaic attenuation pattern"}


def _side(clause: str) -> str:
    c = clause.lower()
    if re.search(r"\b(?:bilateral\w*|both)\b", c) or ("right" in c and "left" in c):
        return "bilateral"
    return "right" if "right" in c else "left" if "left" in c else ""


def _region(clause: str) -> str:
    m = _LOBE.search(clause)
    if not m:
        return ""
    if m.group(1):
        return m.group(1).lower() + " lobe"
    return {2: "lingula", 3: "apex", 4: "base"}[m.lastindex]


def render_finding(name: str, match: re.Match, clause: str) -> str:
    """One short sentence for one positive finding, e.g. "Minimal bilateral pleural effusion."."""
    window = clause[max(0, match.start() - 40):match.end() + 25]
    severity = _SEVERITY.search(window)
    words = [severity.group(1).lower()] if severity else []
    if "calcification" in name.lower():
        words = [w for w in words if w != "calcified"]  # "calcified ... calcification" says it twice
    term = match.group(0).lower()
    label = name.lower()
    if name == "Lung nodule" and (term.endswith("s") or (severity and severity.group(1).lower() in
                                                        {"multiple", "several", "a few"})):
        label = "lung nodules"
    if name == "Lung opacity" and "glass" in term:
        label = "ground-glass lung opacity"
    if name == "Medical material":
        return f"Medical material ({term})."
    if name == "Arterial wall calcification":
        vessel = _VESSEL.search(clause)
        place = vessel.group(1).lower() if vessel else ""
        where = f" in the {'aorta' if place == 'aortic' else place}" if place else ""
        return _sentence(words + [label + where])
    if name == "Lymphadenopathy":
        station = _STATION.search(clause)
        station = re.sub(r"^mediastin\w*", "mediastinal", station.group(1).lower()).replace(
            "hilum", "hilar") if station else ""
        side = _side(clause)
        return _sentence(words + ([side] if side and side != "bilateral" else [])
                         + [station, label])
    if name not in _LUNG_CLASSES:
        return _sentence(words + [label])
    # Side and lobe come from the words around this finding, not from the whole clause, which may
    # list several findings in different places.
    near = clause[max(0, match.start() - 50):match.end() + 60]
    side, region = _side(near), _region(near) if name != "Pleural effusion" else ""
    # the lobe fixes the side: "the right middle lobe of both lungs" is on the right
    lobe_sides = {(a or b).lower() for a, b in re.findall(
        r"\b(right|left) (?:lung )?(?:upper|middle|lower) lobe|\b(?:upper|middle|lower) lobe of the "
        r"(right|left)", near, re.I)}
    if region and lobe_sides:
        side = lobe_sides.pop() if len(lobe_sides) == 1 else "bilateral"
    side = "right" if region == "middle lobe" else "left" if region == "lingula" else side
    if region:
        where = f"in both {region}s".replace("apexs", "apices") if side == "bilateral" \
            else f"in the {side} {region}".replace("  ", " ")
        return _sentence(words + [label, where])
    return _sentence(words + ([side] if side else []) + [label])


def _sentence(words: list[str]) -> str:
    text = " ".join(w for w in words if w)
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------------
# The rule-based backend
# ---------------------------------------------------------------------------------------------------

# Other positive findings are kept only when they name something abnormal (an open list of roots);
# everything else (technique, normal anatomy, recommendations) is dropped.
_ABNORMAL = re.compile(
    r"lesion|mass\b|masses|cyst|hern|fractur|pneumothora|pneumomediast|thicken|dilat|enlarg|ectasi|"
    r"aneurysm|dissect|embol|thromb|calcif|edema|oedema|degenerat|osteophyt|scolio|kyphos|spondyl|"
    r"megaly|itis\b|osis\b|oma\b|omas\b|stone|hypodens|hyperdens|collection|abscess|tumou?r|malign|"
    r"metasta|operat|resect|postop|sclero|lytic|destruct|deform|atroph|lobulat|irregular|goit|"
    r"steato|free air|air-fluid|fluid|infect|pneumon|carcinom|lucen|retract|volume loss|budding|"
    r"honeycomb|cavit|asymmetr|narrow|stenos|occlu|compress|displac|hypertroph|mastectom|lobectom",
    re.I)
_BOILERPLATE = re.compile(
    r"recommend|correlat|follow-?up|compar\w* (?:with|to)|previous|evaluat\w* (?:in favor|as|in terms)|"
    r"be evaluated|technique|contrast (?:material|agent)|sections|window|examin|should|consider|diagnos",
    re.I)
_NOISE = [
    (re.compile(r"\((?:[^()]*\b(?:ima|image|series|se|im|slice)\b[^()]*)\)", re.I), ""),
    (re.compile(r"\b(?:in )?(?:series|se)\s*:?\s*\d+[, ]*(?:image|im|ima)\s*:?\s*\d+", re.I), ""),
    (re.compile(r"\b(?:measuring|with a (?:diameter|size|thickness) of|reaching|approximately|about|"
                r"of|up to)?\s*\d+(?:[.,]\d+)?(?:\s*[x×*]\s*\d+(?:[.,]\d+)?)*\s*(?:mm|cm|hu)\b"
                r"(?:\s*in (?:diameter|size|thickness|length))?", re.I), ""),
    (re.compile(r"\b(?:is|are|was|were|has been|have been)\s+(?:also\s+)?(?:observed|seen|detected|"
                r"noted|identified|present|monitored|visuali[sz]ed)\b", re.I), ""),
    (re.compile(r"^(?:there (?:is|are|was|were)|in addition|additionally|also)\s+", re.I), ""),
    (re.compile(r",?\s*the largest(?: of which)?(?: is| being)?\s*(?=[,.]|$)", re.I), ""),
    (re.compile(r"\s+"), " "),
]
_MEASUREMENT = re.compile(r"^[\W\d]*(?:\w+\W+){0,4}(?:diameter|size|thickness|width|measur\w*|"
                          r"ratio|volume|index)\b.*\d", re.I)


def _shorten(clause: str) -> str:
    for pattern, repl in _NOISE:
        clause = pattern.sub(repl, clause)
    clause = re.sub(r"\s+([,.;)])", r"\1", clause).strip(" ,;:-")
    return clause[:1].upper() + clause[1:] + "." if clause else ""


def _other_finding(clause: str) -> str:
    """A shortened clause for a positive finding outside the 18 classes, or "" to drop it."""
    if _negated_spans(clause) or _BOILERPLATE.search(clause) or not _ABNORMAL.search(clause):
        return ""
    if _MEASUREMENT.search(clause) and not re.search(r"increas|enlarg|dilat|aneurysm", clause, re.I):
        return ""  # "Thoracic aorta diameter is 38 mm": a measurement, not a finding
    short = _shorten(clause)
    return short if len(short.split()) >= 1 and len(short) <= 160 else ""


def _similar(a: str, b: str) -> bool:
    # The impression usually repeats a finding in other words: same words, mostly.
    wa, wb = set(re.findall(r"[a-z]+", a.lower())), set(re.findall(r"[a-z]+", b.lower()))
    return len(wa & wb) >= 0.6 * max(1, min(len(wa), len(wb)))


def check_text(text) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"report is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(text, str):
        raise TypeError(f"report must be str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("report text is empty or whitespace-only")
    return text


def finding_classes(text: str) -> set[str]:
    """The classes among CLASSES that a text mentions positively (negation-aware)."""
    return {name for s in split_sentences(check_text(text)) for c in split_clauses(s)
            for name, _ in _clause_findings(c)}


def summarize_rules(text: str, wording: str = "class") -> list[str]:
    """Rule-based summary: one sentence per positive class finding, then the other positive
    findings as short clauses; duplicates (findings + impression) are merged.

    wording "class" names each class finding with the class name (render_finding), the way the
    paper's GPT-4o summaries are reported to read; "report" keeps the report's own clause for it
    (shortened as the other findings are), so the zero-shot prompt's words are not given away."""
    if wording not in ("class", "report"):
        raise ValueError(f"wording must be 'class' or 'report', got {wording!r}")
    best: dict[str, str] = {}  # class -> its most specific rendering
    others: list[str] = []
    for sentence in split_sentences(check_text(text)):
        for clause in split_clauses(sentence):
            findings = _clause_findings(clause)
            for name, match in findings:
                rendered = render_finding(name, match, clause) if wording == "class" else _shorten(clause)
                if len(rendered) > len(best.get(name, "")):
                    best[name] = rendered
            if not findings:
                other = _other_finding(clause)
                if other and not any(_similar(other, o) for o in others):
                    others.append(other)
    # one clause can name two classes ("plaques in the aorta and coronary arteries"): in the
    # report's wording both render as that clause, and a sentence is said once
    ordered = list(dict.fromkeys(best[c] for c in CLASSES if c in best))
    return ordered + others or [NO_FINDING]
