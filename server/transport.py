"""One message exchange of a round: push, pull until every site replied or the round timeout passed.

`Grid.send_and_receive` does the same with two gaps that matter in a real deployment:
- Flower's HTTP grid sleeps 3 s between pulls, a floor of up to 3 s on each of a round's several
  exchanges (hello, train, evaluate, token moments…); here the SuperLink is polled every 0.5 s;
- a message already handed to a SuperNode that then crashes is lost: the restarted SuperNode keeps its
  node id (it is bound to the site's registered key) but never sees the message again, so the round
  would wait for it until the timeout. Here a node whose message was lost gets it again once it is
  back, within the same round timeout. A lost message shows up in two ways: Flower answers
  NODE_UNAVAILABLE once the node missed its heartbeats (≤ 60 s in Flower 1.42), or the node's
  `last_activated_at` changed since the push (it restarted and was let back in).

A node that does not come back, or a slow one, simply has no reply when the round timeout passes;
the caller logs it and aggregates the others (a round needs `min_sites` replies).

`JobGrid` stamps the run's recipe on every message pushed (also those of SecAgg+, which talks to the Grid
directly), so a site that runs approved jobs only can check each message against what it approved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode  # NODE_UNAVAILABLE = 5; not re-exported by flwr.app in 1.42
from flwr.serverapp import Grid

from braing3n_core.federation.protocol import JobRecipe, Record

POLL_S = 0.5  # how often replies are pulled
NODES_EVERY_S = 2.0  # how often node sessions are checked for restarts
MAX_RESENDS = 3  # per node and exchange: a node that loses its message again and again is left to the timeout


def _sessions(grid: Grid) -> dict[int, str]:
    """Online node id → when its current session began."""
    return {int(node.node_id): str(node.last_activated_at) for node in grid.get_nodes()}


def _copy(message: Message) -> Message:
    """The same content to the same node as a new message (a new id: Flower never re-delivers one)."""
    return Message(message.content, dst_node_id=message.metadata.dst_node_id,
                   message_type=message.metadata.message_type, group_id=message.metadata.group_id)


def exchange(grid: Grid, messages: Sequence[Message], timeout_s: float,
             on_resend: Callable[[int, str], None] | None = None) -> list[Message]:
    """Send one message per node and return the replies that arrived within `timeout_s` (one per node).

    `on_resend(node_id, reason)` is called each time a lost message is sent again.
    """
    deadline = time.monotonic() + timeout_s
    original = {m.metadata.dst_node_id: m for m in messages}
    sessions = _sessions(grid)
    session_at_push: dict[int, str | None] = {}
    pending: dict[str, int] = {}  # message id → node
    lost: dict[int, str] = {}  # node → why its message must be sent again
    resends: dict[int, int] = {}

    def push(batch: list[Message]) -> None:
        accepted = set(grid.push_messages(batch))
        for message in batch:
            node = message.metadata.dst_node_id
            session_at_push[node] = sessions.get(node)
            if message.metadata.message_id in accepted:
                pending[message.metadata.message_id] = node
            else:  # the SuperLink refused it: the node is not online (yet)
                lost[node] = "the SuperLink did not accept the message for this node"

    push(list(messages))
    replies: dict[int, Message] = {}
    next_check = time.monotonic() + NODES_EVERY_S
    while (pending or lost) and time.monotonic() < deadline:
        if pending:
            for reply in grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    lost[node] = "its SuperNode went offline while the message was out"
                else:
                    replies[node] = reply
        if lost or time.monotonic() >= next_check:
            sessions = _sessions(grid)
            next_check = time.monotonic() + NODES_EVERY_S
            for message_id, node in list(pending.items()):
                if node in sessions and sessions[node] != session_at_push.get(node):
                    del pending[message_id]
                    lost[node] = "its SuperNode restarted while the message was out"
            back = [node for node in lost if node in sessions and resends.get(node, 0) < MAX_RESENDS]
            if back:
                for node in back:
                    resends[node] = resends.get(node, 0) + 1
                    if on_resend is not None:
                        on_resend(node, lost[node])
                    del lost[node]
                push([_copy(original[node]) for node in back])
        if pending or lost:
            time.sleep(POLL_S)
    return list(replies.values())


def stamp(messages: Iterable[Message], recipe_json: str) -> None:
    """Put the run's recipe (`Record.JOB`) on each message that lacks it."""
    for message in messages:
        if message.has_content() and Record.JOB not in message.content.config_records:
            message.content[Record.JOB] = ConfigRecord(JobRecipe(recipe=recipe_json).to_config())


class WrappedGrid(Grid):
    """A Grid that hands every call to the Grid it wraps; subclasses change what they must (Flower's `Grid` is
    abstract, so a wrapper has to spell out each method once: here)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:  # type: ignore[override]
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Any:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class JobGrid(WrappedGrid):
    """The run's Grid, with its recipe stamped on every message it pushes."""

    def __init__(self, grid: Grid, recipe_json: str) -> None:
        super().__init__(grid)
        self.recipe_json = recipe_json

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        stamp(messages, self.recipe_json)
        return self.grid.push_messages(messages)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stamp(messages, self.recipe_json)
        return self.grid.send_and_receive(messages, timeout=timeout)
