"""The train handler's privacy mod: client-side clipping for client-level DP, and SecAgg+.

One ClientApp serves both protocols with one train handler (a ClientApp cannot mix a legacy `client_fn`
with `@app.train`), so `privacy_mod` dispatches on what a train message carries:

- a `secaggplus_configs` ConfigRecord: a step of Flower's SecAgg+ protocol. Flower's own `secaggplus_mod`
  runs it; at the "collect masked vectors" step it calls `_legacy_fit`, which translates the legacy
  fit instructions (`fitins.*`, arrays without names) into our train message, runs the ordinary handler
  (DP-SGD, ledger and all), checks the site's own update (the server cannot screen a masked one) and
  answers a legacy fit result whose parameters are the update w_site − w_global, which the mod then
  quantises and masks;
- a `client-dp-clipping` key (set by the server's client-level DP): Flower's `fixedclipping_mod` or
  `adaptiveclipping_mod` clips the reply's update to the server's `clipping_norm`. An update of norm
  zero is passed through unclipped (there is nothing to clip, and Flower's clipping would divide by
  zero: flwrlabs/flower#7631);
- neither: the handler runs untouched. Evaluate and query messages never reach this mod (it is
  attached to the train handler only: Flower's new clipping mods do not check the message type).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from braing3n_core.federation.protocol import NUM_EXAMPLES, ClientClipping, Record, SecureRound, SiteReply

SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS


class SecureRoundError(RuntimeError):
    """This site will not put its update into the secure sum; the message says why (the protocol then
    treats the site as dropped and removes its masks)."""


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if SECAGG_RECORD in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, lambda m, c: _legacy_fit(m, c, call_next))
    return _clipped(msg, context, call_next)


def _update_norm(reply: Message, sent: ArrayRecord) -> float:
    arrays = next(iter(reply.content.array_records.values()))
    total = 0.0
    for key, value in arrays.items():
        diff = value.numpy().astype(np.float64) - sent[key].numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def _clipped(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client-side clipping of the reply's update when the server's client-level DP asks for it."""
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    config = msg.content.config_records.get(Record.CONFIG)
    mode = ClientClipping.from_config(config).client_dp_clipping if config is not None else ""
    if not mode:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error() or len(reply.content.array_records) != 1:
        return reply
    if _update_norm(reply, msg.content[Record.ARRAYS]) == 0.0:
        if mode == "adaptive":  # below any positive norm: not clipped
            next(iter(reply.content.metric_records.values()))["norm_bit"] = 0
        return reply
    flower_mod = fixedclipping_mod if mode == "fixed" else adaptiveclipping_mod
    return flower_mod(_without_job(msg), context, lambda _m, _c: reply)


def _without_job(msg: Message) -> Message:
    """The message as Flower's clipping mods expect it: they refuse more than one ConfigRecord, and the run's recipe
    (`Record.JOB`, which the approval gate reads) is a second one."""
    if Record.JOB not in msg.content.config_records:
        return msg
    return Message(RecordDict({k: v for k, v in msg.content.items() if k != Record.JOB}), metadata=msg.metadata)


def _legacy_fit(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+'s fit step: legacy fit instructions in, our handler, a legacy fit result (the update) out."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    secure = SecureRound.from_config(config)
    names = secure.secagg_array_names
    weights = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(weights):
        raise SecureRoundError(f"received {len(weights)} arrays for {len(names)} names")
    sent = ArrayRecord({k: Array(np.ascontiguousarray(w)) for k, w in zip(names, weights)})
    content = RecordDict({Record.CONFIG: ConfigRecord(config), Record.ARRAYS: sent})
    if Record.JOB in msg.content.config_records:  # the recipe the approval gate checks (client/app.py)
        content[Record.JOB] = msg.content[Record.JOB]
    inner = Message(content, metadata=msg.metadata)
    reply = _clipped(inner, context, call_next)
    if reply.has_error():
        raise SecureRoundError(reply.error.reason)
    arrays = {k: v.numpy() for k, v in reply.content[Record.ARRAYS].items()}
    update = [arrays[k].astype(np.float64) - w.astype(np.float64) for k, w in zip(names, weights)]
    site = SiteReply.from_config(reply.content[Record.SITE]).site_id
    _check_own_update(site, update, secure)
    metrics: dict = {**dict(reply.content[Record.METRICS]), SiteReply.key("site_id"): site}
    if Record.PRIVACY in reply.content.config_records:
        metrics |= dict(reply.content[Record.PRIVACY])
    weight = 1 if secure.uniform_weight else round(float(metrics[NUM_EXAMPLES]))
    if weight > secure.secagg_max_weight:
        raise SecureRoundError(f"site {site}: its weight {weight} exceeds secure_aggregation.max_weight="
                               f"{secure.secagg_max_weight:g}; the masked sum could overflow")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([u.astype(np.float32) for u in update]), weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _check_own_update(site: str, update: list[np.ndarray], secure: SecureRound) -> None:
    """What the server would have screened, checked here (it only ever sees the masked sum)."""
    if not all(bool(np.all(np.isfinite(u))) for u in update):
        raise SecureRoundError(f"site {site}: its update holds NaN/Inf; not adding it to the secure sum")
    norm = math.sqrt(sum(float(np.dot(u.ravel(), u.ravel())) for u in update))
    bound = secure.update_norm_bound
    if bound and norm > bound:
        raise SecureRoundError(f"site {site}: update norm {norm:.4g} exceeds the bound {bound:.4g}")
    largest = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    limit = secure.secagg_clipping_range
    if largest > limit:
        raise SecureRoundError(f"site {site}: an update coordinate of {largest:.4g} exceeds "
                                 f"secure_aggregation.clipping_range={limit:g}; it would be cut when quantised")
