"""Several workers on one host (the setup `bench/pipeline.py --workers N` measures): each with
its own web port and data folder, one consumer group splitting the partitions between them,
and any worker answering the lookup of any ad."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from classify_app.dev.broker import LocalBroker
from classify_app.dev.images import SampleImageServer
from tests.support.workers import (
    Samples,
    Worker,
    assert_result_matches,
    plan_ads,
    produce,
    scrape,
    total,
    wait_for_results,
)

PARTITIONS = 8  # the local profile's
# One inference stream of one thread each: two workers share two cores.
ENV = {"CLASSIFY_INFERENCE_THREADS": "1", "CLASSIFY_TORCH_THREADS": "1"}


def ads_partitions(samples: Samples) -> set[int]:
    """The partitions of `ads` a worker is assigned (it reports the lag of each)."""
    return {
        int(dict(labels)["partition"])
        for (name, labels), _ in samples.items()
        if name == "classify_consumer_lag" and dict(labels).get("topic") == "ads"
    }


async def wait_for_split(workers: list[Worker], timeout: float = 60) -> list[set[int]]:
    """Until the group's assignment covers every partition once, each worker holding some."""
    async with asyncio.timeout(timeout):
        while True:
            held = [ads_partitions(await scrape(worker.url)) for worker in workers]
            every = [partition for partitions in held for partition in partitions]
            if all(held) and sorted(every) == list(range(PARTITIONS)):
                return held
            await asyncio.sleep(0.5)


async def test_two_workers_on_one_host_split_the_partitions_and_both_answer_every_lookup(
    broker: LocalBroker, images: SampleImageServer, workers: Callable[..., Worker]
) -> None:
    first, second = workers(env=ENV), workers(env=ENV)
    await asyncio.gather(first.start(), second.start())
    assert first.url != second.url and first.datadir != second.datadir
    held = await wait_for_split([first, second])
    assert not held[0] & held[1]

    ads = plan_ads(images, 60, seed=41, bad_share=0.1, max_images=2)
    await produce(broker.bootstrap, ads)
    answers = [await wait_for_results(worker.url, ads, timeout=120) for worker in (first, second)]
    for ad in ads:
        assert_result_matches(ad, answers[0][ad.ad_id])
        assert answers[1][ad.ad_id] == answers[0][ad.ad_id]  # the same answer, either worker

    # Each worker finished the ads of its own partitions, and no ad was finished twice.
    finished = [total(await scrape(worker.url), "classify_ads_total") for worker in (first, second)]
    assert all(count > 0 for count in finished), finished
    assert sum(finished) == len(ads)
    assert await wait_for_split([first, second], timeout=5) == held  # no rebalance meanwhile
