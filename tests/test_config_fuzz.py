"""The config loader, fuzzed: whatever a YAML file holds, loading it either gives a
validated experiment or one UserError line; never another exception, never a traceback."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talkingmodels.config import load_config
from talkingmodels.errors import UserError

KEYS = ["task", "settings", "task_options", "methods", "seeds", "train", "out", "name", "label",
        "rounds", "message_dim", "w1", "channel", "epochs", "lr", "data_dir", "teacher",
        "hidden", "stop_gradient", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["movielens", "td", "dense", "linear"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12)
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


def check(tmp_path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except UserError as error:
        assert "\n" not in str(error) and str(error)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=configs)
def test_structured_configs(tmp_path, data):
    data = {"task": "movielens", **data} if "task" not in data else data
    for key in ("task_options",):  # keep the fuzz away from the real data and a download
        if isinstance(data.get(key), dict):
            data[key] = {**data[key], "download": False}
    check(tmp_path, yaml.safe_dump(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_arbitrary_text(tmp_path, text):
    check(tmp_path, text)
