"""The thin Flower (1.42, Message API) adapter over :mod:`umit.federated.site` and
:mod:`umit.federated.server`.

- :data:`client_app`: a ``ClientApp`` with ``@query`` (describe the site's data), ``@train`` (one
  round of :meth:`Site.train_round`) and ``@evaluate`` (:meth:`Site.evaluate`). Where the site's
  data is comes from the node config (``flower-supernode --node-config``): ``prep`` (PREP folder),
  ``work`` (the site's local state folder), optionally ``site`` (its name) and ``site-key`` /
  ``site-value`` (only the cases of one catalog value). The run's settings come from the server
  in every message (``config["umit-federated"]``), so sites need no config file.
- :data:`server_app`: a ``ServerApp`` whose ``main`` reads the run config ``umit-config`` (a
  :class:`FederatedConfig` YAML) and calls :func:`serve`: describe the sites, then Flower's
  ``FedAvg`` / ``FedProx`` ``start()`` with a :class:`GlobalRun` recording every round.
- :class:`LocalGrid`: a ``Grid`` that calls the ClientApp in this process, one site after the
  other (no SuperLink, no Ray, no network): the in-process mode of tests and laptops.

Weights travel as ``ArrayRecord`` built from / turned back into torch state dicts.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from umit.config import build_config
from umit.errors import InputError
from umit.federated.config import FederatedConfig, SiteSpec
from umit.federated.server import GlobalRun, merge_descriptions
from umit.federated.site import Site, TaskSpec
from umit.utils.fileio import atomic_write_json

log = logging.getLogger(__name__)

CONFIG_KEY = "umit-federated"
"""ConfigRecord entry holding the run's settings (JSON of :class:`FederatedConfig`)."""
SPEC_KEY = "umit-spec"
"""ConfigRecord entry holding the :class:`TaskSpec` (JSON)."""
SITE_KEY = "site"
"""RecordDict entry of a reply naming the site (a ConfigRecord ``{"site": name}``)."""
RUN_CONFIG_KEY = "umit-config"
"""Flower run config entry: path of the :class:`FederatedConfig` YAML the server reads."""
SUMMARY_FILE = "summary.json"

# What a site needs of the config: not the server's paths.
_SERVER_ONLY = {"sites", "data", "site_values", "out"}


def site_message_config(cfg: FederatedConfig, spec: TaskSpec | None = None) -> ConfigRecord:
    """The ConfigRecord every message to a site carries."""
    rec = ConfigRecord({CONFIG_KEY: cfg.model_dump_json(exclude=_SERVER_ONLY)})
    if spec is not None:
        rec[SPEC_KEY] = json.dumps(spec.to_dict())
    return rec


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------
def site_from(context: Context, config: ConfigRecord) -> Site:
    """The :class:`Site` of this node (node config) for this run (the message's config)."""
    node = dict(context.node_config)
    missing = [k for k in ("prep", "work") if not node.get(k)]
    if missing:
        raise InputError(
            None,
            f"node config lacks {missing}: start the SuperNode with --node-config "
            "\"prep='/path/PREP' work='/path/work' site='name'\"",
        )
    prep = Path(str(node["prep"]))
    spec = SiteSpec(
        name=str(node.get("site") or prep.name),
        prep=prep,
        key=str(node["site-key"]) if node.get("site-key") else None,
        value=str(node["site-value"]) if node.get("site-value") is not None else None,
    )
    cfg = FederatedConfig.model_validate_json(str(config[CONFIG_KEY]))
    return Site(spec, cfg, Path(str(node["work"])))


def _spec(config: ConfigRecord) -> TaskSpec:
    return TaskSpec.from_dict(json.loads(str(config[SPEC_KEY])) if SPEC_KEY in config else None)


client_app = ClientApp()


@client_app.query()
def describe(msg: Message, context: Context) -> Message:
    """Describe the site's data (plan, case counts, labels) for the server."""
    site = site_from(context, msg.content["config"])
    record = ConfigRecord({"site": site.name, "description": json.dumps(site.describe())})
    return Message(RecordDict({SITE_KEY: record}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: global weights in, local weights + ``num-examples`` + metrics out."""
    config = msg.content["config"]
    site = site_from(context, config)
    mu = config.get("proximal-mu")
    result = site.train_round(
        msg.content["arrays"].to_torch_state_dict(),
        int(config["server-round"]),
        _spec(config),
        proximal_mu=None if mu is None else float(mu),
    )
    metrics = MetricRecord({**result.metrics, "num-examples": result.num_examples})
    content = RecordDict(
        {
            "arrays": ArrayRecord(result.state_dict),
            "metrics": metrics,
            SITE_KEY: ConfigRecord({"site": site.name}),
        }
    )
    return Message(content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validate the global weights on the site's validation cases."""
    config = msg.content["config"]
    site = site_from(context, config)
    n, metrics = site.evaluate(msg.content["arrays"].to_torch_state_dict(), _spec(config))
    content = RecordDict(
        {
            "metrics": MetricRecord({**metrics, "num-examples": n}),
            SITE_KEY: ConfigRecord({"site": site.name}),
        }
    )
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------
def _reply_site(msg: Message, names: Mapping[int, str], sent: Mapping[str, int]) -> str:
    """The site a reply comes from: named in the reply, else by the node the instruction went to
    (an error the SuperLink makes for an unreachable node does not come from that node)."""
    if not msg.has_error() and SITE_KEY in msg.content:
        return str(msg.content[SITE_KEY]["site"])
    node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
    return names.get(node, f"node-{node}")


def _error_text(msg: Message) -> str:
    reason = (msg.error.reason or "").strip()
    last = reason.splitlines()[-1] if reason else ""
    return f"error code {msg.error.code}: {last or 'no reason given'}"


class _Recording:
    """Mixed into Flower's FedAvg / FedProx: absolute round numbers after a resume, and every
    round recorded by the :class:`GlobalRun` (per-site metrics and errors, the global checkpoint)."""

    def __init__(
        self, *args: Any, run: GlobalRun, names: dict[int, str], offset: int, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.run = run
        self.names = names
        self.offset = offset
        self._sent: dict[str, list[Message]] = {}
        self._bytes_down = 0
        self._started = 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Any:
        msgs = list(super().configure_train(server_round + self.offset, arrays, config, grid))
        self._sent["train"] = msgs  # the grid gives them their ids when it sends them
        self._bytes_down = arrays.count_bytes()
        self._started = time.perf_counter()
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid) -> Any:
        msgs = list(super().configure_evaluate(server_round + self.offset, arrays, config, grid))
        self._sent["eval"] = msgs
        return msgs

    def _site_records(
        self, rnd: int, split: str, replies: list[Message]
    ) -> tuple[list[dict[str, Any]], list[Message]]:
        records, ok = [], []
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.get(split, [])}
        for m in replies:
            name = _reply_site(m, self.names, sent)
            if m.has_error():
                records.append(
                    {"round": rnd, "split": split, "site": name, "error": _error_text(m)}
                )
                log.warning("round %d: site %s failed (%s)", rnd, name, _error_text(m))
                continue
            ok.append(m)
            metrics = {k: v for k, v in m.content["metrics"].items() if not isinstance(v, list)}
            records.append({"round": rnd, "split": split, "site": name, **metrics})
        answered = {sent.get(m.metadata.reply_to_message_id) for m in replies}
        for node in sorted(set(sent.values()) - answered):
            name = self.names.get(node, f"node-{node}")
            records.append(
                {
                    "round": rnd,
                    "split": split,
                    "site": name,
                    "error": f"no reply within round_timeout={self.run.cfg.round_timeout:g} s",
                }
            )
            log.warning("round %d: site %s did not reply", rnd, name)
        return records, ok

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        rnd = server_round + self.offset
        replies = list(replies)
        records, ok = self._site_records(rnd, "train", replies)
        arrays, agg = super().aggregate_train(rnd, ok)
        up = [m.content["arrays"].count_bytes() for m in ok]
        present = {r["site"] for r in records}
        summary: dict[str, Any] = {
            "round": rnd,
            "split": "train",
            "site": "global",
            "sites_ok": len(ok),
            "sites_failed": len(records) - len(ok),
            "sites_absent": sorted(set(self.names.values()) - present),
            "bytes_down_per_site": self._bytes_down,
            "bytes_up_per_site": max(up) if up else 0,
            "round_s": time.perf_counter() - self._started,
        }
        if agg is not None:
            summary.update({k: v for k, v in agg.items() if not isinstance(v, list)})
        sites = {}
        for m in ok:
            metrics = m.content["metrics"]
            info: dict[str, Any] = {"num_examples": int(metrics["num-examples"]), "round": rnd}
            if "epsilon" in metrics:
                info["dp"] = {k[3:]: float(v) for k, v in metrics.items() if k.startswith("dp_")}
                info["dp"]["epsilon"] = float(metrics["epsilon"])
            sites[_reply_site(m, self.names, {})] = info
        self.run.log([*records, summary])
        state = arrays.to_torch_state_dict() if arrays is not None else None
        self.run.save_round(rnd, state, sites)
        return arrays, agg

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        rnd = server_round + self.offset
        replies = list(replies)
        if not replies and not self._sent.get("eval"):
            return None
        records, ok = self._site_records(rnd, "eval", replies)
        agg = weighted_means([dict(m.content["metrics"]) for m in ok])
        self.run.log([*records, {"round": rnd, "split": "eval", "site": "global", **agg}])
        return MetricRecord(agg) if agg else None


class FedAvgRun(_Recording, FedAvg):
    """Flower's FedAvg, recorded by a :class:`GlobalRun`."""


class FedProxRun(_Recording, FedProx):
    """Flower's FedProx (sends ``proximal-mu``), recorded by a :class:`GlobalRun`."""


def weighted_means(metrics: list[dict[str, Any]], weight: str = "num-examples") -> dict[str, float]:
    """Per key, the mean over sites weighted by ``weight``, skipping NaN values and sites of
    weight 0 (a site without validation cases); keys no site could compute are left out."""
    out: dict[str, float] = {}
    keys = sorted({k for m in metrics for k in m if k != weight})
    for k in keys:
        pairs = [
            (float(m[weight]), float(m[k]))
            for m in metrics
            if isinstance(m.get(k), int | float) and math.isfinite(float(m[k])) and m[weight] > 0
        ]
        total = sum(w for w, _ in pairs)
        if total > 0:
            out[k] = sum(w * v for w, v in pairs) / total
    out[weight] = float(sum(float(m.get(weight, 0)) for m in metrics))
    return out


def make_strategy(
    cfg: FederatedConfig, run: GlobalRun, names: dict[int, str], offset: int, min_sites: int
) -> FedAvg:
    """Flower's FedAvg / FedProx: every connected site trains and validates each round."""
    kwargs: dict[str, Any] = {
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
        "fraction_evaluate": 1.0 if cfg.evaluate else 0.0,
        "run": run,
        "names": names,
        "offset": offset,
    }
    if cfg.strategy == "fedprox":
        return FedProxRun(proximal_mu=cfg.proximal_mu, **kwargs)
    return FedAvgRun(**kwargs)


def wait_for_sites(grid: Grid, n: int, timeout: float) -> list[int]:
    """Node ids once ``n`` sites are connected (an error after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise InputError(
                None, f"only {len(nodes)} of min_sites={n} sites connected within {timeout:g} s"
            )
        time.sleep(1.0)


def describe_sites(
    grid: Grid, cfg: FederatedConfig, run: GlobalRun, nodes: list[int]
) -> tuple[dict[str, dict[str, Any]], dict[int, str]]:
    """Ask every connected site for its description; failures are logged and recorded."""
    msgs = [
        Message(
            RecordDict({"config": site_message_config(cfg)}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in nodes
    ]
    descriptions: dict[str, dict[str, Any]] = {}
    names: dict[int, str] = {}
    records = []
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            records.append(
                {"round": run.round, "split": "describe", "site": f"node-{node}"}
                | {"error": _error_text(reply)}
            )
            log.warning("site on node %d cannot take part: %s", node, _error_text(reply))
            continue
        desc = json.loads(str(reply.content[SITE_KEY]["description"]))
        names[node] = desc["site"]
        descriptions[desc["site"]] = desc
    if len(names) != len(set(names.values())):
        raise InputError(None, f"two sites have the same name: {sorted(names.values())}")
    run.log(records)
    return descriptions, names


def serve(grid: Grid, cfg: FederatedConfig, min_sites: int | None = None) -> dict[str, Any]:
    """The whole server side of a run on any Grid: resume, describe, rounds, final artifact.

    Returns:
        A summary (also written to ``out/summary.json``).
    """
    run = GlobalRun(cfg)
    started = time.perf_counter()
    done = run.open()
    try:
        need = min_sites or cfg.min_sites or max(1, len(cfg.sites) or 1)
        nodes = wait_for_sites(grid, need, cfg.round_timeout)
        descriptions, names = describe_sites(grid, cfg, run, nodes)
        plan, spec = merge_descriptions(cfg, descriptions)
        run.set_layout(plan, spec)
        initial = run.initial_state()
        if done < cfg.rounds:
            strategy = make_strategy(cfg, run, names, offset=done, min_sites=need)
            config = site_message_config(cfg, run.spec)
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(initial),
                num_rounds=cfg.rounds - done,
                timeout=cfg.round_timeout,
                train_config=config,
                evaluate_config=ConfigRecord(dict(config)),
            )
        artifact = run.finish()
        summary = {
            "out": str(cfg.out),
            "task": cfg.task,
            "strategy": cfg.strategy,
            "rounds": run.round,
            "resumed_at_round": done,
            "sites": sorted(descriptions),
            "artifact": str(artifact),
            "seconds": time.perf_counter() - started,
        }
        atomic_write_json(Path(cfg.out) / SUMMARY_FILE, summary)
        return summary
    finally:
        run.close()


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: ``flwr run`` with ``--run-config "umit-config='fed.yaml'"``."""
    path = context.run_config.get(RUN_CONFIG_KEY)
    if not path:
        raise InputError(
            None,
            f"the Flower run config has no {RUN_CONFIG_KEY!r} (the umit federated YAML): "
            f"flwr run APP --run-config \"{RUN_CONFIG_KEY}='fed.yaml'\"",
        )
    serve(grid, build_config(FederatedConfig, str(path)))


# ---------------------------------------------------------------------------------------------
# in-process mode
# ---------------------------------------------------------------------------------------------
class LocalGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one after the other.

    Each node has a Flower ``Context`` (node config, persistent state) like a SuperNode's. A
    ClientApp exception becomes an error reply (code ``CLIENT_APP_RAISED_EXCEPTION``), as a
    SuperNode sends it, so a failing site is reported and the round goes on with the others.
    Replies come back in node order, so the average is summed in the same order every run.

    Args:
        app: the ClientApp to call.
        node_configs: one node config per site (``prep``, ``work``, ``site``, ...).
        run_id: the run's id.
    """

    def __init__(self, app: ClientApp, node_configs: list[dict[str, Any]], run_id: int = 1):
        self.app = app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            i + 1: Context(
                run_id=run_id,
                node_id=i + 1,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config={},
            )
            for i, cfg in enumerate(node_configs)
        }
        self._replies: dict[str, Message] = {}
        # What Flower's ServerApp runtime sets in its process before main(): new messages take
        # their run and source node from it.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id  # the SuperLink's job
            self._replies[msg_id] = self._deliver(msg)
            ids.append(msg_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.app(msg, context)
        except Exception as exc:
            log.debug("ClientApp raised on node %d", msg.metadata.dst_node_id, exc_info=True)
            reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = self.pull_messages(self.push_messages(messages))
        return sorted(replies, key=lambda m: m.metadata.src_node_id)
