"""Which pods are injected: every row of the truth table docs/injection.md publishes, run through the one
function that decides (``kube.policy.decide``). The table is the test's data: a row changed in the document
is a test changed."""

from __future__ import annotations

import re

import pytest

from istio_iptables.kube.policy import PodFacts, decide
from istio_iptables.kube.template import InjectorConfig, LabelSelector
from tests.helpers import ROOT

DOCUMENT = ROOT / "docs" / "injection.md"
COLUMNS = (
    "host network",
    "namespace",
    "namespace label istio-injection",
    "pod label sidecar.istio.io/inject",
    "pod annotation sidecar.istio.io/inject",
    "already injected",
    "pod labels match",
    "policy",
    "injected",
)
SELECTOR = LabelSelector(match_labels={"tier": "db"}, match_expressions=())
"""The selectors of the table's ``pod labels match`` column: a pod whose labels match has tier=db."""


def truth_table() -> list[dict[str, str]]:
    lines = DOCUMENT.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| host network |"))
    assert tuple(cell.strip() for cell in lines[header].strip("|").split("|")) == COLUMNS
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cells = [re.sub(r"`", "", cell).strip() for cell in line.strip().strip("|").split("|")]
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


ROWS = truth_table()


def test_the_table_has_a_row_for_each_rule() -> None:
    assert len(ROWS) >= 15
    assert {row["injected"] for row in ROWS} == {"yes", "no"}


@pytest.mark.parametrize("row", ROWS, ids=[f"row{number + 1}" for number in range(len(ROWS))])
def test_truth_table_row(row: dict[str, str]) -> None:
    def given(column: str) -> str | None:
        return None if row[column] == "\u2013" else row[column]  # the table's en dash: not set

    labels = {"app": "shop"}
    annotations = {}
    if given("pod label sidecar.istio.io/inject") is not None:
        labels["sidecar.istio.io/inject"] = row["pod label sidecar.istio.io/inject"]
    if given("pod annotation sidecar.istio.io/inject") is not None:
        annotations["sidecar.istio.io/inject"] = row["pod annotation sidecar.istio.io/inject"]
    if row["already injected"] == "yes":
        annotations["sidecar.istio.io/status"] = "{}"
    match = given("pod labels match") or ""
    if match:
        labels["tier"] = "db"
    namespace_label = given("namespace label istio-injection")
    pod = PodFacts(
        labels=labels,
        annotations=annotations,
        host_network=row["host network"] == "yes",
        namespace=row["namespace"],
        namespace_labels=None
        if namespace_label is None
        else {}
        if namespace_label == "(none)"
        else {"istio-injection": namespace_label},
    )
    config = InjectorConfig(
        policy=row["policy"],
        never_inject=(SELECTOR,) if "never" in match else (),
        always_inject=(SELECTOR,) if "always" in match else (),
    )
    decision = decide(pod, config)
    assert decision.inject == (row["injected"] == "yes"), decision.reason
    assert decision.reason
