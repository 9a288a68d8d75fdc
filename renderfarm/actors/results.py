"""A node's finished images into the result store (cluster/blobs): written several at once, and taken back
when the batch's results are not kept."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from renderfarm.cluster.blobs import BlobStore, result_keys

log = logging.getLogger(__name__)


class ResultWriter:
    def __init__(self, blobs: BlobStore, node: str, threads: int = 4):
        self.blobs, self.node = blobs, node
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"blobs-{node}")

    def store(self, results: list[Any]) -> list[list[str]]:
        """Write each result's PNGs, several at once (a directory store syncs each file to disk, an object
        store waits on the network); their URLs, per result, in order. On a failure, what this batch wrote is
        deleted (best effort: retention sweeps what is left) and the first error raised."""
        pending = [[self._pool.submit(self.blobs.put, key, png)
                    for key, png in zip(result_keys(result.job_id, len(result.images)), result.images)]
                   for result in results]
        written: list[list[str]] = []
        error: BaseException | None = None
        for futures in pending:
            urls = []
            for future in futures:
                try:
                    urls.append(future.result())
                except Exception as exc:
                    error = error or exc
            written.append(urls)
        if error is not None:
            self.delete([url for urls in written for url in urls])
            raise error
        return written

    def delete(self, urls: list[str]) -> None:
        for url in urls:
            try:
                self.blobs.delete(url)
            except Exception as exc:  # left for retention to sweep
                log.warning("node %s: could not delete blob %s: %s", self.node, url, exc)
