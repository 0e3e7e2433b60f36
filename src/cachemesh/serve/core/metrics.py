"""Prometheus metrics of the server (``GET /metrics``).

One :class:`Metrics` per service, on its own registry (so that several servers
in one process, as in the tests, do not collide). Names::

    cachemesh_requests_total{model,outcome}         requests answered (ok, client_error, error, ...)
    cachemesh_request_duration_seconds{model}       latency of answered requests, load waits included
    cachemesh_inflight_requests{model}              requests in the server now
    cachemesh_model_hits_total{model}               requests that found their model in memory
    cachemesh_model_misses_total{model}             requests that waited for a load
    cachemesh_model_load_seconds{model}             cache misses: time to bring a model into memory
    cachemesh_load_queue_delay_seconds              time a load waited for a slot
    cachemesh_load_failures_total{model}            failed load attempts
    cachemesh_evictions_total{model}                models evicted to make room
    cachemesh_loaded_models                         models in memory
    cachemesh_memory_budget_bytes                   the budget (--memory)
    cachemesh_memory_held_bytes                     what the workers hold (max of RSS and accounted)
    cachemesh_model_bytes{model}                    measured size of each loaded model
    cachemesh_worker_rss_bytes{worker}              each worker's resident memory
    cachemesh_worker_restarts_total                 workers replaced after they died
    cachemesh_worker_recycles_total                 idle workers restarted to free leaked memory
    cachemesh_version_requests_total{model,version} requests by the version that took them
    cachemesh_model_copies{model,version}           ready copies of each version
    cachemesh_forwards_total{outcome}               requests sent to another node (ok, error:
                                                    it answered 5xx, unreachable: retried
                                                    elsewhere, lost: it died holding it,
                                                    refused: a forwarded request came without
                                                    the cluster token)
    cachemesh_forward_duration_seconds              forwarded requests, from here to the end
                                                    of the other node's answer
    cachemesh_remote_loads_total                    loads this node asked another node to do
    cachemesh_cluster_lease_renewals_total          keep-alives of this node's lease (cluster mode)
    cachemesh_cluster_etcd_errors_total             calls to etcd that failed (cluster mode)
    cachemesh_cluster_degraded                      1 while etcd cannot be reached (cluster mode)

Requests of every protocol count in the first three (V2 inference, and the OpenAI
routes: completions, chat, embeddings; a stream's duration is its whole length).
Generative requests also export the figures LLM servers do, under vLLM's names
and label, so that dashboards and autoscalers made for vLLM read them unchanged::

    vllm:prompt_tokens_total{model_name}              prompt tokens of answered requests
    vllm:generation_tokens_total{model_name}          tokens generated
    vllm:time_to_first_token_seconds{model_name}      streamed requests: admission to first text
    vllm:time_per_output_token_seconds{model_name}    streamed requests: between tokens, averaged
    vllm:num_requests_running{model_name}             generating now
    vllm:num_requests_waiting{model_name}             waiting for their model to load
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_LOAD = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cachemesh_requests", "Requests answered.",
                                ["model", "outcome"], registry=r)
        self.latency = Histogram("cachemesh_request_duration_seconds",
                                 "Latency of answered requests, load waits included.",
                                 ["model"], buckets=_LATENCY, registry=r)
        self.inflight = Gauge("cachemesh_inflight_requests", "Requests in the server now.",
                              ["model"], registry=r)
        self.hits = Counter("cachemesh_model_hits", "Requests that found their model in memory.",
                            ["model"], registry=r)
        self.misses = Counter("cachemesh_model_misses", "Requests that waited for a model load.",
                              ["model"], registry=r)
        self.load_time = Histogram("cachemesh_model_load_seconds",
                                   "Time to bring a model into memory (a cache miss).",
                                   ["model"], buckets=_LOAD, registry=r)
        self.queue_delay = Histogram("cachemesh_load_queue_delay_seconds",
                                     "Time a load waited for a load slot.", buckets=_LOAD,
                                     registry=r)
        self.load_failures = Counter("cachemesh_load_failures", "Failed load attempts.",
                                     ["model"], registry=r)
        self.evictions = Counter("cachemesh_evictions", "Models evicted to make room.",
                                 ["model"], registry=r)
        self.loaded = Gauge("cachemesh_loaded_models", "Models in memory.", registry=r)
        self.budget = Gauge("cachemesh_memory_budget_bytes", "The memory budget.", registry=r)
        self.held = Gauge("cachemesh_memory_held_bytes",
                          "Memory the workers hold (max of RSS and accounted).", registry=r)
        self.model_bytes = Gauge("cachemesh_model_bytes", "Measured size of a loaded model.",
                                 ["model"], registry=r)
        self.worker_rss = Gauge("cachemesh_worker_rss_bytes", "Resident memory of a worker.",
                                ["worker"], registry=r)
        self.restarts = Counter("cachemesh_worker_restarts", "Workers replaced after they died.",
                                registry=r)
        self.recycles = Counter(
            "cachemesh_worker_recycles",
            "Idle workers restarted to give back memory no loaded model accounts for.",
            registry=r)

        self.routed = Counter("cachemesh_version_requests",
                              "Requests by the version they were routed to.",
                              ["model", "version"], registry=r)
        self.copies = Gauge("cachemesh_model_copies", "Ready copies of a model version.",
                            ["model", "version"], registry=r)

        label = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of answered requests.",
                                     label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label,
                                         registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Streamed requests: from admission to the first text.", label,
                              buckets=_TTFT, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Streamed requests: time between output tokens, averaged.",
                              label, buckets=_TPOT, registry=r)
        self.running = Gauge("vllm:num_requests_running", "Generative requests generating now.",
                             label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting",
                             "Generative requests waiting for their model to load.", label,
                             registry=r)
        self.forwards = Counter("cachemesh_forwards", "Requests sent to another node.",
                                ["outcome"], registry=r)
        self.forward_latency = Histogram("cachemesh_forward_duration_seconds",
                                         "Forwarded requests, to the end of the answer.",
                                         buckets=_LATENCY, registry=r)
        self.remote_loads = Counter("cachemesh_remote_loads",
                                    "Loads this node asked another node to do.", registry=r)

        self.cluster_renewals = Counter("cachemesh_cluster_lease_renewals",
                                        "Keep-alives of this node's lease.", registry=r)
        self.cluster_errors = Counter("cachemesh_cluster_etcd_errors",
                                      "Calls to etcd that failed.", registry=r)
        self.cluster_degraded = Gauge("cachemesh_cluster_degraded",
                                      "1 while etcd cannot be reached (serving goes on).",
                                      registry=r)
        self._cluster_seen = (0, 0)

        self._llm: dict[str, LLMSeries] = {}

    def llm(self, model: str) -> LLMSeries:
        """The vLLM-named series of one model, looked up once."""
        series = self._llm.get(model)
        if series is None:
            series = self._llm[model] = LLMSeries(
                self.prompt_tokens.labels(model), self.generation_tokens.labels(model),
                self.ttft.labels(model), self.tpot.labels(model), self.running.labels(model),
                self.waiting.labels(model))
        return series

    def observe_cluster(self, renewals: int, errors: int, degraded: bool) -> None:
        """Bring the cluster series up to the membership's own counts."""
        seen_renewals, seen_errors = self._cluster_seen
        if renewals > seen_renewals:
            self.cluster_renewals.inc(renewals - seen_renewals)
        if errors > seen_errors:
            self.cluster_errors.inc(errors - seen_errors)
        self._cluster_seen = (max(renewals, seen_renewals), max(errors, seen_errors))
        self.cluster_degraded.set(1 if degraded else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(eq=False)
class LLMSeries:
    prompt: Any
    generated: Any
    ttft: Any
    tpot: Any
    running: Any
    waiting: Any

    def tokens(self, result: dict[str, Any], first_text_at: float | None = None) -> None:
        """Count an answer's tokens (``prompt_tokens``, ``completion_tokens``, as the
        runtimes report them); a stream whose first text came at ``first_text_at``
        (``time.perf_counter``) also gives the time per output token after it."""
        prompt = int(result.get("prompt_tokens") or 0)
        generated = int(result.get("completion_tokens") or 0)
        self.prompt.inc(prompt)
        self.generated.inc(generated)
        if first_text_at is not None and generated > 1:
            self.tpot.observe((time.perf_counter() - first_text_at) / (generated - 1))
