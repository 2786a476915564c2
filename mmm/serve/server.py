"""`Server`: what the endpoints share: the settings, the worker processes, the jobs, and the
steps of a request that happen in the server process (the token, the form, the queue)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
from collections.abc import Mapping
from typing import Any

import anyio
from fastapi import Request

from mmm.generation.request import SamplingConfig
from mmm.serve.errors import ApiError
from mmm.serve.forms import DECODING_DEFAULTS, TASK_FIELDS, decode_fields, fields_of, read_form
from mmm.serve.jobs import Job, Jobs, QueueFull
from mmm.serve.music import EXAMPLES
from mmm.serve.settings import Settings
from mmm.serve.workers import Died, Pool, Worker, worker_context

PARSER_HINT = "the file may make the MIDI parser hang or crash: try another file, or save it again from another program"
GENERATION_HINT = "ask for fewer bars or variations, or raise job_timeout_s on the server"


class Server:
    """`model`: what the generation worker loads, an `MMM` or a picklable function returning one;
    `checks_model`: what the workers that read and check uploads load (default: `model`)."""

    def __init__(
        self, model: Any, settings: Settings, card: Mapping[str, Any] | None = None, checks_model: Any = None
    ) -> None:
        settings.check()
        self.settings, self.card = settings, dict(card or {})
        context, level = worker_context(), logging.getLogger().getEffectiveLevel()
        self.generator = Worker("mmm-serve-generate", model, context, level)
        checkers = [
            Worker(f"mmm-serve-check-{i}", model if checks_model is None else checks_model, context, level)
            for i in range(settings.check_workers)
        ]
        self.checkers = Pool(checkers)
        # Threads waiting for a checker: one per worker, the other requests wait without a thread.
        self.check_slots = anyio.CapacityLimiter(settings.check_workers)
        self.jobs = Jobs(settings.queue_size, settings.keep_jobs)
        self.started = False

    @property
    def workers(self) -> list[Worker]:
        return [self.generator, *self.checkers.workers]

    def start(self) -> None:
        """Start the worker processes and wait until each has loaded the model (`RuntimeError` if
        one could not)."""
        if self.started:
            return
        for w in self.workers:
            w.start()
        try:
            for w in self.workers:
                w.wait_ready()
        except (Died, RuntimeError) as err:
            for w in self.workers:
                w.stop(wait_s=0)  # the others are still loading: no need to wait for them
            raise RuntimeError(f"a worker process could not load the model: {err}") from None
        self.started = True

    def close(self) -> None:
        self.jobs.close()
        for w in self.workers:
            w.stop()

    # -- a request, in the server process ---------------------------------------------------------
    def authorize(self, authorization: str | None) -> None:
        token = self.settings.token
        scheme, _, given = (authorization or "").partition(" ")
        if token and (scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode())):
            raise ApiError(
                401,
                "unauthorized",
                "send the server's token as 'Authorization: Bearer <token>' (the studio asks for it)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def checked(self, request: Request, task: str | None) -> Job:
        """The request read, checked (the upload in a checking worker) and queued as a job."""
        fields, upload, filename = await read_form(request, self.settings.max_upload_bytes)
        if task is None:
            task = fields.pop("task", None)
            if task is None:
                raise ApiError(
                    422, "missing_field", f"POST /v1/jobs needs the field task ({', '.join(TASK_FIELDS)})", "task"
                )
        values = decode_fields(task, fields, upload, self.settings)
        args = (task, values, upload, filename)
        bars = await self._check_in_worker("check", args, f"reading {filename}")
        job = Job(task, functools.partial(self._generate, args=args), bars * values.get("num_variations", 1))
        try:
            return self.jobs.submit(job)
        except QueueFull as err:
            raise ApiError(
                503,
                "queue_full",
                f"the server is busy ({self.settings.queue_size} requests queued); retry in {err.retry_after_s} s",
                headers={"Retry-After": str(err.retry_after_s)},
            ) from None

    async def analyze(self, request: Request) -> dict[str, Any]:
        fields, upload, filename = await read_form(request, self.settings.max_upload_bytes)
        if fields:
            raise ApiError(
                422, "unknown_field", f"analyze takes only 'file', got {', '.join(sorted(fields))}", next(iter(fields))
            )
        if upload is None:
            raise ApiError(400, "missing_file", "analyze needs the MIDI file in the multipart field 'file'", "file")
        return await self._check_in_worker("analyze", (upload, filename), f"analysing {filename}")

    async def _check_in_worker(self, kind: str, args: tuple, what: str) -> Any:
        timeout = self.settings.check_timeout_s
        call = self.checkers.call
        return await anyio.to_thread.run_sync(
            call, kind, args, timeout, what, PARSER_HINT, "file", limiter=self.check_slots
        )

    def _generate(self, job: Job, args: tuple) -> dict[str, Any]:
        """The job's work, from the dispatcher thread: the generation worker runs it."""
        timeout = self.settings.job_timeout_s
        return self.generator.call(
            "generate",
            args,
            timeout,
            "the generation",
            GENERATION_HINT,
            progress=job.progress,
            cancel=job.cancel_requested,
        )

    # -- what the server says about itself --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        model = self.generator.info
        if model is None:
            raise ApiError(503, "worker_starting", "the model is still loading; retry in a few seconds")
        return {
            **model,
            "model": {
                **model["model"],
                **self.card,
                "license": self.settings.license or self.card.get("license") or "unknown",
            },
            "tasks": {t: fields_of(t) for t in TASK_FIELDS},
            "sampling": dataclasses.asdict(SamplingConfig()),
            "decoding": DECODING_DEFAULTS,
            "limits": {
                "max_upload_bytes": self.settings.max_upload_bytes,
                "max_variations": self.settings.max_variations,
                "max_new_bars": self.settings.max_new_bars,
                "queue_size": self.settings.queue_size,
                "job_timeout_s": self.settings.job_timeout_s,
                "check_timeout_s": self.settings.check_timeout_s,
            },
            "examples": {name: text for name, (text, _) in EXAMPLES.items()},
            "auth": bool(self.settings.token),
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "worker_alive": self.jobs.dispatcher.is_alive() and self.generator.alive,
            **self.jobs.stats(),
            "worker_restarts": sum(w.restarts for w in self.workers),
        }
