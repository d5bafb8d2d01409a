"""The named parameters of the big statements match their $n, one for one."""

from __future__ import annotations

import re

import pytest

from orders.db.orders import CHANGE_SQL, PLACE_SQL, ChangeParams, PlaceParams


@pytest.mark.parametrize(("sql", "params"), [(PLACE_SQL, PlaceParams), (CHANGE_SQL, ChangeParams)])
def test_every_parameter_is_named_and_every_name_is_a_parameter(sql, params):
    numbers = {int(n) for n in re.findall(r"\$(\d+)", sql)}
    assert numbers == set(range(1, len(params._fields) + 1))
