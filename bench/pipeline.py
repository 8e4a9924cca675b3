"""End-to-end benchmark: a local broker, worker processes, a local image server, real ads.

    python bench/pipeline.py [--ads 1000] [--rate 20] [--seconds 30] [--env NAME=VALUE ...]
                             [--warm-up 200] [--model-rounds 10] [--out FILE]
    python bench/pipeline.py --compare CLASSIFY_METRICS=false,true [--ads 400] [--rounds 2]
    python bench/pipeline.py --tasks "category;category,embedding" [--ads 400] [--rounds 2]
    python bench/pipeline.py --workers 2 --env CLASSIFY_INFERENCE_THREADS=1 \
                             --env CLASSIFY_TORCH_THREADS=1

Measures, in one invocation:
  * the bare model: `bench/model.py` in a process with the worker's environment (allocator
    settings, `--env`) but all cores for torch, best of batch 8 and 16, once before and once
    after the pipeline runs; the ratio is taken against the faster of the two; on a CPU
    also one single-threaded `bench/model.py` per core at once (batch 4) after it, the sum of
    their images/s: the model's best on these cores, and the pipeline's ratio to that;
  * worker start-to-ready time (process start -> `/readyz` 200);
  * sustained throughput, after `--warm-up` ads: `--ads` single-image ads produced as fast as
    possible, images/s from the first event produced to the last result published on
    `results`, and how many batches ran on average inside the pipeline, at what speed;
  * latency at a steady rate: `--rate` ads/s for `--seconds`; end to end = event produced ->
    final result readable from `GET /classify/results/{ad_id}` (the `results` topic says when
    to ask, one GET confirms);
  * the worker's RSS (ready, after warm-up, after each run, peak) and the CPU used by the
    worker, the broker and this process (producer, consumer, image server) during each run;
  * the CPU each image costs outside the model, in milliseconds: the worker's CPU time minus
    its inference threads' (per-thread times from /proc, each kind of thread apart: event
    loop, decode, Kafka consumer, other), plus the broker's and the load generator's.

`--workers N` starts N workers on the one broker, each with its own web port and data folder
(one consumer group: they split the partitions); the throughput counts every worker's results,
the latency asks the first worker (any worker answers every lookup), CPU and RSS are each
worker's. Give each worker its share of the cores, e.g. `--env CLASSIFY_INFERENCE_THREADS=1
--env CLASSIFY_TORCH_THREADS=1` for two on two cores (else each runs two threads in its one stream).
Prints a table and writes the numbers as JSON.

`--image-processes K` serves the sample photos from K processes on one port instead of a thread
of this one, so that the load generator does not cap many workers (their CPU counts as the
load generator's).

`--tasks "category;category,embedding;category,embedding,moderation"` compares the model tasks
the same way (the first list is the baseline of the ratios).

`--compare NAME=A,B` measures instead what one setting costs: the same throughput run against
workers with `NAME=A` and `NAME=B`, alternating, `--rounds` times each, in one invocation
(`RESULTS_FETCH_WAIT_MS=A,B`: the benchmark's own `--results-fetch-wait-ms` instead),
with `/metrics` scraped every second as Prometheus would; it reports images/s, the garbage
collector's pauses and the worker's peak RSS for each value. Used for the metrics overhead
(`CLASSIFY_METRICS=false,true`) and for `gc.freeze` (`CLASSIFY_GC_FREEZE=false,true`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from metering import THREAD_KINDS, MeteredWorker, ProcessMeter, metered_worker

from classify_app.dev.broker import LocalBroker, running_broker
from classify_app.dev.images import SampleImageServer, serving_images
from classify_app.dev.processes import free_port, wait_until_ready, worker_environment
from classify_app.sdk import AsyncClassifyClient

BENCH = Path(__file__).resolve().parent
PHOTOS = ("coffee", "chelsea", "camera", "motorcycle")


def model_command(out: Path, *, threads: int, batch_sizes: str, rounds: int) -> list[str]:
    return [
        sys.executable,
        str(BENCH / "model.py"),
        "--threads",
        str(threads),
        "--batch-sizes",
        batch_sizes,
        "--rounds",
        str(rounds),
        "--out",
        str(out),
    ]


def bare_model(env: dict[str, str], rounds: int, batch_sizes: str = "8,16") -> dict:
    """The model alone, through `bench/model.py` in a process with the worker's environment
    (allocator and thread settings): its best images/s over `batch_sizes`, after warm-up."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "model.json"
        # All cores: the bare model at its best in one stream, whatever the worker is given.
        command = model_command(out, threads=0, batch_sizes=batch_sizes, rounds=rounds)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        numbers = json.loads(out.read_text())
    best = max(numbers["batches"], key=lambda row: row["images_per_second"])
    return {
        "images_per_second": best["images_per_second"],
        "batch_size": best["batch_size"],
        "device": numbers["device"],
        "precision": numbers["precision"],
        "batches": numbers["batches"],
    }


def bare_model_streams(env: dict[str, str], rounds: int, batch_size: int = 4) -> dict:
    """The model alone in one single-threaded process per core, all at once (on two cores,
    what the worker's two inference streams of one thread each could do at best): the sum of
    their images/s. Each times `rounds` batches (150 by default, about 6 s here), long enough
    that processes started together time mostly the same stretch."""
    streams = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        outs = [Path(scratch) / f"model-{n}.json" for n in range(streams)]
        running = [
            subprocess.Popen(
                model_command(out, threads=1, batch_sizes=str(batch_size), rounds=rounds),
                env=env,
                stdout=subprocess.DEVNULL,
            )
            for out in outs
        ]
        if any(process.wait() for process in running):
            raise RuntimeError("a bare-model stream failed")
        each = [json.loads(out.read_text())["batches"][0]["images_per_second"] for out in outs]
    return {
        "images_per_second": round(sum(each), 1),
        "streams": streams,
        "batch_size": batch_size,
        "each_images_per_second": each,
    }


def results_consumer(broker: LocalBroker, fetch_wait_ms: int = 5) -> AIOKafkaConsumer:
    """A consumer of `results` from its end, fetching every `fetch_wait_ms` (Tansu answers a
    fetch only when its wait is over). 5 ms adds no latency of its own to what it measures,
    but costs the broker and this process about 13 % of a core even with nothing to fetch
    (2 % at 100 ms), taken from the workers on a shared machine: the throughput run waits
    longer (`--results-fetch-wait-ms`), which adds at most that to its last result."""
    return AIOKafkaConsumer(
        "results",
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="latest",
        group_id=None,
        fetch_max_wait_ms=fetch_wait_ms,
    )


@contextlib.contextmanager
def serving_image_processes(count: int) -> Iterator[tuple[SampleImageServer, list[int]]]:
    """The sample photos served by `count` processes sharing one port (a thread of this one
    when 0): a server to build URLs with, and the processes' ids, whose CPU is metered."""
    if not count:
        with serving_images() as images:
            yield images, []
        return
    port = free_port()
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    processes = [
        context.Process(target=serve_images_forever, args=(port, ready), daemon=True)
        for _ in range(count)
    ]
    try:
        for process in processes:
            process.start()
        for _ in processes:
            ready.get(timeout=60)
        yield SampleImageServer(port), [process.pid for process in processes if process.pid]
    finally:
        for process in processes:
            process.terminate()
            process.join(10)


def serve_images_forever(port: int, ready: Any) -> None:
    """A process's image server on the shared `port`; puts its id on `ready` once serving."""

    async def serve() -> None:
        await SampleImageServer(port, reuse_port=True).start()
        ready.put(os.getpid())
        await asyncio.Event().wait()

    asyncio.run(serve())


def ad_event(ad_id: str, images: SampleImageServer, number: int) -> bytes:
    photo = PHOTOS[number % len(PHOTOS)]
    return json.dumps(
        {"ad_id": ad_id, "catalog_name": "bench", "images": [images.photo_url(photo)]}
    ).encode()


def nearest_rank(ordered: list[float], share: float) -> float:
    """The value below which `share` of the sorted values lie (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def throughput_run(
    broker: LocalBroker, images: SampleImageServer, count: int, fetch_wait_ms: int
) -> dict:
    """Produce `count` single-image ads at once; time until every result is published."""
    prefix = f"tp-{time.time_ns()}"
    expected = {f"{prefix}-{n}" for n in range(count)}
    consumer = results_consumer(broker, fetch_wait_ms)
    await consumer.start()
    await consumer.getmany(timeout_ms=200)  # positions the consumer at the end
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    started = time.time()
    for number in range(count):
        ad_id = f"{prefix}-{number}"
        await producer.send("ads", ad_event(ad_id, images, number), key=ad_id.encode())
    await producer.flush()
    await producer.stop()
    produced = time.time() - started
    seen: set[str] = set()
    arrivals: list[float] = []  # seconds from the first ad produced to each result
    batch_sizes: list[int] = []
    inference = 0.0  # seconds the model ran, each batch counted once
    try:
        async with asyncio.timeout(max(120, count / 5)):
            while not expected <= seen:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        result = json.loads(record.value)
                        if result["ad_id"] in expected and result["ad_id"] not in seen:
                            seen.add(result["ad_id"])
                            arrivals.append(time.time() - started)
                            for image in result["images"]:
                                timings = image["timings"]
                                batch_sizes.append(timings.get("batch_size", 0))
                                if timings.get("batch_size"):
                                    inference += (
                                        timings["inference_seconds"] / timings["batch_size"]
                                    )
    finally:
        await consumer.stop()
    elapsed = time.time() - started
    return {
        "ads": count,
        "images": count,
        "produce_seconds": round(produced, 3),
        "seconds": round(elapsed, 3),
        "images_per_second": round(count / elapsed, 1),
        # When results came: steadily through the run, or held back while the ads were read
        # (rounded as `seconds` is, so that the two compare).
        "results_at_seconds": {
            share: round(nearest_rank(arrivals, share), 3) for share in (0.0, 0.1, 0.5, 0.9)
        },
        "mean_batch_size": round(statistics.mean(batch_sizes), 2) if batch_sizes else None,
        # Batches running on average (one per busy inference thread), and the model's speed
        # per busy thread: a model slower here than alone fights the rest of the worker for
        # the cores; fewer batches running than inference threads means it waits for images.
        "model_batches_running": round(inference / elapsed, 3),
        "model_images_per_thread_second": round(count / inference, 1) if inference else None,
    }


async def latency_run(
    broker: LocalBroker, images: SampleImageServer, web_url: str, rate: float, seconds: float
) -> dict:
    """Offer `rate` ads/s for `seconds`; each ad's latency is produce -> final result over HTTP.

    The `results` topic says when to look (it is published after the table write); one
    `GET /classify/results/{ad_id}` then confirms the final result is readable, and its answer
    time ends the measurement. Polling every ad over HTTP instead would load the worker with
    the benchmark's own requests."""
    consumer = results_consumer(broker)
    await consumer.start()
    await consumer.getmany(timeout_ms=200)  # positions the consumer at the end
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    prefix = f"lat-{time.time_ns()}"
    count = int(rate * seconds)
    sent: dict[str, float] = {}
    latencies: dict[str, float] = {}
    internal: list[float] = []

    async def confirm(client: AsyncClassifyClient, ad_id: str) -> None:
        while True:
            result = await client.result(ad_id)
            if result is not None and result.final:
                latencies[ad_id] = time.time() - sent[ad_id]
                internal.append(result.latency_seconds or 0.0)
                return
            await asyncio.sleep(0.01)

    async def offer() -> None:
        start = time.monotonic()
        for number in range(count):
            await asyncio.sleep(max(0.0, start + number / rate - time.monotonic()))
            ad_id = f"{prefix}-{number}"
            sent[ad_id] = time.time()
            await producer.send_and_wait("ads", ad_event(ad_id, images, number), key=ad_id.encode())

    async with AsyncClassifyClient(web_url) as client:
        offering = asyncio.create_task(offer())
        confirmations: set[asyncio.Task[None]] = set()
        confirming: set[str] = set()
        try:
            async with asyncio.timeout(seconds + 120):
                while len(latencies) < count:
                    batches = await consumer.getmany(timeout_ms=100)
                    for record in (r for records in batches.values() for r in records):
                        ad_id = record.key.decode()
                        if ad_id in sent and ad_id not in confirming:
                            confirming.add(ad_id)
                            confirmations.add(asyncio.create_task(confirm(client, ad_id)))
                    done = {task for task in confirmations if task.done()}
                    confirmations -= done
                    await asyncio.gather(*done)
        finally:
            await offering
            await producer.stop()
            await consumer.stop()
    ordered = sorted(latencies.values())

    def percentile(p: float) -> float:
        return round(nearest_rank(ordered, p) * 1000, 1)

    return {
        "rate_ads_per_second": rate,
        "ads": len(ordered),
        "p50_ms": percentile(0.50),
        "p95_ms": percentile(0.95),
        "p99_ms": percentile(0.99),
        "max_ms": round(ordered[-1] * 1000, 1),
        "internal_p50_ms": round(statistics.median(internal) * 1000, 1),
    }


async def measure(
    args: argparse.Namespace,
    broker: LocalBroker,
    images: SampleImageServer,
    image_pids: list[int],
    env: dict[str, str],
) -> dict:
    with contextlib.ExitStack() as running:
        workers = [
            running.enter_context(
                metered_worker(
                    broker.url, Path(tempfile.mkdtemp(prefix="classify-bench-")), extra_env=env
                )
            )
            for _ in range(args.workers)
        ]
        web_url = workers[0].url  # any worker answers every lookup (the table's router)

        def cpu_now() -> dict[str, Any]:
            return cpu_reading(workers, broker, image_pids)

        ready = max(await asyncio.gather(*(wait_until_ready(w.url) for w in workers)))
        rss_ready = [w.meter.rss_mb() for w in workers]
        # Warm the whole path (first fetches, batch shapes, allocator; with several workers,
        # the group's rebalances) before measuring.
        await throughput_run(broker, images, args.warm_up, args.results_fetch_wait_ms)
        rss_warm = [w.meter.rss_mb() for w in workers]
        before = cpu_now()
        throughput = await throughput_run(broker, images, args.ads, args.results_fetch_wait_ms)
        after = cpu_now()
        throughput["cpu_percent"] = cpu_percent(before, after, throughput["seconds"])
        throughput["cpu_ms_per_image"] = cpu_per_image(before, after, throughput["images"])
        throughput["worker_rss_mb"] = [round(w.meter.rss_mb()) for w in workers]
        before = cpu_now()
        started = time.monotonic()
        latency = await latency_run(broker, images, web_url, args.rate, args.seconds)
        latency["cpu_percent"] = cpu_percent(before, cpu_now(), time.monotonic() - started)
        latency["worker_rss_mb"] = [round(w.meter.rss_mb()) for w in workers]
        device = await worker_device(web_url)
        for worker in workers:  # stopping together, not one after another
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.meter.pid, signal.SIGTERM)
    return {
        "workers": args.workers,
        "worker_device": device,
        "worker_ready_seconds": round(ready, 2),
        "worker_rss_mb": {  # of each worker
            "ready": [round(rss) for rss in rss_ready],
            "after_warm_up": [round(rss) for rss in rss_warm],
            "after_throughput": throughput["worker_rss_mb"],
            "after_latency": latency["worker_rss_mb"],
            "peak": [round(w.meter.peak_rss_mb) for w in workers],
        },
        "throughput": throughput,
        "latency": latency,
        "worker_logs": [str(w.log_path) for w in workers],
    }


def cpu_reading(
    workers: list[MeteredWorker], broker: LocalBroker, image_pids: list[int] | None = None
) -> dict[str, Any]:
    """CPU seconds so far: each worker's by kind of thread, the broker's, and the load
    generator's: this process's (the producer, the consumer and, without `image_pids`, the
    image server) and its image server processes'."""
    assert broker.process is not None
    generator = [os.getpid(), *(image_pids or [])]
    return {
        "workers": [worker.meter.thread_cpu_seconds() for worker in workers],
        "broker": ProcessMeter(broker.process.pid).cpu_seconds(),
        "benchmark": sum(ProcessMeter(pid).cpu_seconds() for pid in generator),
    }


def cpu_percent(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, int]:
    """The share of one core each process used between two `cpu_reading`s (the workers
    together)."""
    workers = sum(
        sum(a.values()) - sum(b.values())
        for a, b in zip(after["workers"], before["workers"], strict=True)
    )
    return {
        "worker": round(100 * workers / seconds),
        "broker": round(100 * (after["broker"] - before["broker"]) / seconds),
        "benchmark": round(100 * (after["benchmark"] - before["benchmark"]) / seconds),
    }


def cpu_per_image(before: dict[str, Any], after: dict[str, Any], images: int) -> dict[str, Any]:
    """Milliseconds of CPU per image outside the model: the workers' CPU time minus their
    inference threads' (per-thread times from /proc), and the broker's and the load
    generator's; with each kind of worker thread apart, so that a change shows what it saved."""
    threads = dict.fromkeys(THREAD_KINDS, 0.0)
    for a, b in zip(after["workers"], before["workers"], strict=True):
        for kind in THREAD_KINDS:
            threads[kind] += a[kind] - b[kind]
    worker = sum(seconds for kind, seconds in threads.items() if kind != "inference")
    broker = after["broker"] - before["broker"]
    generator = after["benchmark"] - before["benchmark"]

    def ms(seconds: float) -> float:
        return round(1000 * seconds / images, 2)

    return {
        "outside_model": ms(worker + broker + generator),
        "worker_outside_model": ms(worker),
        "broker": ms(broker),
        "load_generator": ms(generator),
        "inference": ms(threads["inference"]),
        "worker_threads": {kind: ms(max(0.0, seconds)) for kind, seconds in threads.items()},
    }


async def worker_device(web_url: str) -> dict[str, Any]:
    """The worker's model device and, on CUDA, its peak GPU memory, from its `/metrics`."""
    scrape = await scrape_once(web_url)
    device: dict[str, Any] = {}
    for line in scrape.splitlines():
        if line.startswith("classify_model_info{"):
            labels = line[line.index("{") + 1 : line.index("}")]
            for pair in labels.split('",'):
                name, _, value = pair.partition("=")
                if name in ("device", "device_name"):
                    device[name] = value.strip('"')
        elif line.startswith("classify_gpu_memory_max_allocated_bytes"):
            device["peak_gpu_memory_mb"] = round(float(line.split()[-1]) / 2**20, 1)
    return device


async def scrape_once(web_url: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{web_url}/metrics") as response,
    ):
        return await response.text()


async def scrape_every_second(web_url: str, stop: asyncio.Event) -> str:
    """Scrape `/metrics` once a second until `stop` is set; returns the last scrape."""
    text = ""
    async with AsyncClassifyClient(web_url) as client:
        while not stop.is_set():
            async with client._session.get(f"{web_url}/metrics") as response:
                if response.status == 200:
                    text = await response.text()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    return text


def gc_pauses(scrape: str) -> dict[str, float]:
    """Total GC pause seconds and collections of generation 2 (the full ones) in a scrape."""
    numbers = {"gen2_collections": 0.0, "gen2_pause_seconds": 0.0, "pause_seconds": 0.0}
    for line in scrape.splitlines():
        if line.startswith("classify_gc_pause_seconds_sum"):
            numbers["pause_seconds"] += float(line.split()[-1])
            if 'generation="2"' in line:
                numbers["gen2_pause_seconds"] = float(line.split()[-1])
        elif line.startswith('classify_gc_pause_seconds_count{generation="2"}'):
            numbers["gen2_collections"] = float(line.split()[-1])
    return numbers


async def compare_setting(
    args: argparse.Namespace, broker: LocalBroker, images: SampleImageServer
) -> dict:
    """Throughput, GC pauses and peak RSS for each value of one setting, alternating."""
    if args.tasks:  # task lists hold commas: `;` separates them
        name, values = "CLASSIFY_TASKS", args.tasks.split(";")
    else:
        name, _, listed = args.compare.partition("=")
        values = listed.split(";" if ";" in listed else ",")  # values with commas: NAME=A;B
    runs: dict[str, list[dict]] = {value: [] for value in values}
    harness = name == "RESULTS_FETCH_WAIT_MS"  # the benchmark's own setting, not the worker's
    for round_number in range(args.rounds):
        for value in runs:
            workdir = Path(tempfile.mkdtemp(prefix="classify-bench-"))
            fetch_wait_ms = int(value) if harness else args.results_fetch_wait_ms
            env = {} if harness else {name: value}
            with metered_worker(broker.url, workdir, extra_env=env) as worker:
                await wait_until_ready(worker.url)
                await throughput_run(broker, images, 32, fetch_wait_ms)
                # Collections before the run (importing, loading, warming up) are not its own.
                collected = gc_pauses(await scrape_once(worker.url))
                stop = asyncio.Event()
                scraping = asyncio.create_task(scrape_every_second(worker.url, stop))
                before = cpu_reading([worker], broker)
                result = await throughput_run(broker, images, args.ads, fetch_wait_ms)
                cpu = cpu_per_image(before, cpu_reading([worker], broker), result["images"])
                worker.meter.rss_mb()
                stop.set()
                scrape = await scraping
            run = {
                "images_per_second": result["images_per_second"],
                "cpu_ms_per_image": cpu,
                "peak_rss_mb": round(worker.meter.peak_rss_mb),
                **{k: v - collected[k] for k, v in gc_pauses(scrape).items()},
            }
            runs[value].append(run)
            print(f"round {round_number + 1}, {name}={value}: {run}")
    summary = {
        value: {
            "mean_images_per_second": round(statistics.mean(r["images_per_second"] for r in rs), 1),
            "mean_cpu_ms_per_image_outside_model": round(
                statistics.mean(r["cpu_ms_per_image"]["outside_model"] for r in rs), 2
            ),
            "mean_worker_cpu_ms_per_image_outside_model": round(
                statistics.mean(r["cpu_ms_per_image"]["worker_outside_model"] for r in rs), 2
            ),
            "mean_gc_pause_seconds": round(statistics.mean(r["pause_seconds"] for r in rs), 4),
            "mean_gen2_collections": round(statistics.mean(r["gen2_collections"] for r in rs), 1),
            "mean_gen2_pause_seconds": round(
                statistics.mean(r["gen2_pause_seconds"] for r in rs), 4
            ),
        }
        for value, rs in runs.items()
    }
    baseline = summary[values[0]]["mean_images_per_second"]
    for numbers in summary.values():  # against the first value, measured in the same run
        numbers["images_per_second_ratio"] = round(numbers["mean_images_per_second"] / baseline, 3)
    return {"setting": name, "ads_per_run": args.ads, "runs": runs, "summary": summary}


def main() -> None:
    """Run the benchmark and print and save its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warm-up", type=int, default=200, help="ads before measuring")
    parser.add_argument(
        "--model-rounds", type=int, default=10, help="bare-model batches timed (0: no bare model)"
    )
    parser.add_argument("--model-batch-sizes", default="8,16", help="the bare model's best of")
    parser.add_argument("--compare", default="", help="NAME=A,B: one setting's cost")
    parser.add_argument(
        "--tasks", default="", help="LIST;LIST...: compare task lists (CLASSIFY_TASKS)"
    )
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the worker (repeatable)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="worker processes on the one broker")
    parser.add_argument(
        "--results-fetch-wait-ms",
        type=int,
        default=50,
        help="how long the throughput run's consumer of results waits in a fetch",
    )
    parser.add_argument(
        "--image-processes",
        type=int,
        default=0,
        help="processes serving the sample photos (0: a thread of this one)",
    )
    parser.add_argument("--out", default="bench-results/pipeline.json")
    args = parser.parse_args()

    if args.compare or args.tasks:
        with running_broker() as broker, serving_images() as images:
            comparison = asyncio.run(compare_setting(args, broker, images))
        out = Path(args.out).with_name(f"compare-{comparison['setting'].lower()}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(comparison, indent=2))
        for value, numbers in comparison["summary"].items():
            print(f"{comparison['setting']}={value}: {numbers}")
        print(f"written to {out}")
        return

    env = dict(item.split("=", 1) for item in args.env)
    model_env = worker_environment("", Path(tempfile.gettempdir()), env)

    def bare_model_runs() -> list[dict]:
        if not args.model_rounds:
            return []
        return [bare_model(model_env, args.model_rounds, args.model_batch_sizes)]

    # Before and after the pipeline: this machine's speed drifts, and the ratio is taken
    # against the faster of the two, so that drift cannot flatter the pipeline.
    bare_runs = bare_model_runs()
    broker = LocalBroker()
    broker.start()
    try:
        with serving_image_processes(args.image_processes) as (images, image_pids):
            numbers = asyncio.run(measure(args, broker, images, image_pids, env))
    finally:
        broker.stop()
    bare_runs += bare_model_runs()
    on_cpu = bool(bare_runs) and str(bare_runs[0]["device"]).startswith("cpu")
    streams = bare_model_streams(model_env, 15 * args.model_rounds) if on_cpu else None
    numbers["worker_env"] = env
    numbers["image_processes"] = args.image_processes
    numbers["results_fetch_wait_ms"] = args.results_fetch_wait_ms
    numbers["bare_model"] = None
    numbers["pipeline_to_bare_model"] = None
    if bare_runs:
        best = max(bare_runs, key=lambda run: run["images_per_second"])
        numbers["bare_model"] = {
            **best,
            "before_and_after_images_per_second": [run["images_per_second"] for run in bare_runs],
        }
        numbers["pipeline_to_bare_model"] = round(
            numbers["throughput"]["images_per_second"] / best["images_per_second"], 3
        )
    numbers["bare_model_streams"] = streams
    numbers["pipeline_to_bare_model_streams"] = (
        round(numbers["throughput"]["images_per_second"] / streams["images_per_second"], 3)
        if streams
        else None
    )
    numbers["machine"] = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(numbers, indent=2))
    t, lat, rss = numbers["throughput"], numbers["latency"], numbers["worker_rss_mb"]
    cpu = t["cpu_ms_per_image"]
    print(
        f"machine                   {numbers['machine']['cpus']} CPUs, {numbers['machine']['cpu']}"
    )
    print(f"workers                   {numbers['workers']}, env {env or 'defaults'}")
    print(f"worker start to ready     {numbers['worker_ready_seconds']:>8} s")
    print(f"worker device             {numbers['worker_device']}")
    bare, ratio = numbers["bare_model"], numbers["pipeline_to_bare_model"]
    if bare is not None:
        print(
            f"bare model                {bare['images_per_second']:>8} images/s "
            f"(batch {bare['batch_size']}, {bare['device']}, {bare['precision']}; before and "
            f"after the pipeline: {bare['before_and_after_images_per_second']})"
        )
    if streams is not None:
        print(
            f"bare model, {streams['streams']} streams   {streams['images_per_second']:>8} "
            f"images/s (one single-threaded process per core at once, batch "
            f"{streams['batch_size']}: {streams['each_images_per_second']}; the pipeline is "
            f"{numbers['pipeline_to_bare_model_streams']:.0%} of it)"
        )
    print(
        f"pipeline, {t['ads']} ads        {t['images_per_second']:>8} images/s "
        f"({'' if ratio is None else f'{ratio:.0%} of bare model, '}"
        f"mean batch {t['mean_batch_size']}); CPU % {t['cpu_percent']}"
    )
    print(
        "results arrived at        "
        + ", ".join(f"{share:.0%}: {at} s" for share, at in t["results_at_seconds"].items())
        + f" (of {t['seconds']} s; {t['produce_seconds']} s to produce the ads)"
    )
    print(
        f"model inside the pipeline  {t['model_batches_running']:.2f} batches running on "
        f"average, {t['model_images_per_thread_second']} images/s per busy inference thread"
    )
    print(
        f"CPU ms per image          {cpu['outside_model']} outside the model: worker "
        f"{cpu['worker_outside_model']} (by thread {cpu['worker_threads']}), broker "
        f"{cpu['broker']}, load generator {cpu['load_generator']}; model {cpu['inference']}"
    )
    print(
        f"latency at {lat['rate_ads_per_second']:g} ads/s      p50 {lat['p50_ms']} ms, "
        f"p95 {lat['p95_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms; "
        f"CPU % {lat['cpu_percent']}"
    )
    print(
        f"worker RSS (MB)           ready {rss['ready']}, after warm-up {rss['after_warm_up']}, "
        f"after throughput {rss['after_throughput']}, after latency {rss['after_latency']}, "
        f"peak {rss['peak']}"
    )
    print(f"written to {out}")


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
