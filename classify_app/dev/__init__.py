"""Local stand-ins for the outside world, for the quick start, the tests and the benchmarks:
the embedded broker (`broker`), the MongoDB-protocol server (`mongo`), worker processes
(`processes`), sample photos and hostile image answers (`images`), and the quick start itself.

Development tooling only: a worker never imports it (Faust's autodiscovery skips it, a test
checks the imports) and the Docker image leaves it out.
"""
