import pytest

from paretune.data import TASKS, get_task
from paretune.errors import ParetuneError


@pytest.mark.parametrize("name", list(TASKS))
def test_split_is_fixed_disjoint_and_sized(name):
    task = get_task(name)
    train, test = task.splits()
    key = "text" if task.kind == "classification" else "prompt"
    train_inputs = {r[key] for r in train.rows}
    test_inputs = {r[key] for r in test.rows}
    assert not train_inputs & test_inputs
    assert len(train_inputs) == len(train) and len(test_inputs) == len(test)  # no duplicate inputs
    assert 0.12 < len(test) / (len(train) + len(test)) < 0.28
    again_train, again_test = task.splits()
    assert again_train.rows == train.rows and again_test.rows == test.rows
    assert task.metric == ("accuracy" if task.kind == "classification" else "exact_match")


def test_city_continent_labels_are_real():
    train, test = get_task("city-continent").splits()
    assert set(train.labels()) == {"Africa", "Asia", "Europe", "North America", "Oceania", "South America"}
    rows = {r["text"]: r["label"] for r in train.rows + test.rows}
    assert rows.get("Nairobi") == "Africa" and rows.get("Lyon") == "Europe" and rows.get("Osaka") == "Asia"
    assert len(train) > 20_000


def test_generation_tasks_have_known_answers():
    rows = {r["prompt"]: r["completion"] for t in ("country-capital",) for r in sum((d.rows for d in get_task(t).splits()), [])}
    assert rows["Country: France\nCapital:"] == " Paris"
    rows = {r["prompt"]: r["completion"] for r in sum((d.rows for d in get_task("city-country").splits()), [])}
    assert rows["City: Osaka\nCountry:"] == " Japan"


def test_unknown_task_lists_known():
    with pytest.raises(ParetuneError, match="city-continent"):
        get_task("city-contnent")
