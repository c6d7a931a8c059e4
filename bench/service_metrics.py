"""The service's /metrics page: fetched with the lean client, read with prometheus_client's own parser."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from bench.http_client import Connection, HttpError, prepare_get


async def scrape(base_url: str) -> str:
    """The Prometheus text exposition at `base_url`/metrics; HttpError unless it answers 200."""
    connection = Connection.for_url(base_url)
    try:
        status, body = await connection.send(prepare_get(f"{base_url}/metrics"))
    finally:
        await connection.close()
    if status != 200:
        raise HttpError(f"{base_url}/metrics answered {status}")
    return body.decode()


def metric_value(metrics_text: str, name: str) -> float | None:
    """The value of the unlabelled sample `name` (a gauge such as convnext_queue_depth), or None when absent."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return None


def histogram_buckets(metrics_text: str, name: str) -> dict[str, float]:
    """Cumulative buckets {le: count} of histogram `name`, summed over any other labels."""
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = sample.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets
