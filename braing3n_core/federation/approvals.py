"""The gate every message of a job passes at a site that requires approval (`approval.required` in its file).

`admit` decides from the site file, its approval log (`federation.approval_log`), the app's own bundle hash
(`client/fab.py`) and the message (its recipe in the `job` record, its kind and `config` record), and
nothing else: no scan and no cache is read before a job is admitted. A refusal (`NotApproved`, a
`SiteDeclined`) names what is missing (no approval of this app; the recipe not covered; an approval revoked, by
whom and when; a request outside the approved recipe) and travels back to the server as the site's
decline reason, which the run's ledger and `consortium status` show.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from braing3n_core.federation.approval_log import Approval, ApprovalLog, ApprovalLogError, local_time
from braing3n_core.federation.protocol import ProtocolError, SiteDeclined
from braing3n_core.federation.recipe import Recipe, check_request
from braing3n_core.site_config import SiteConfig


class NotApproved(SiteDeclined):
    """This site has no active approval for the job (or the request is outside the approved recipe)."""


def _short(digest: str) -> str:
    return digest[:12] + "…"


def admit(site: SiteConfig, fab_sha256: Callable[[], str], recipe_json: str | None, kind: str,
          config: Mapping[str, Any]) -> Approval | None:
    """The approval that lets this request touch the site's data; `NotApproved` naming what is missing otherwise.

    Reads nothing but the site file, the log, the app's own files (`fab_sha256`, called only when the site
    requires approval) and the message: no scan, no cache. None when the site does not require approval.
    """
    if not site.approval.required:
        return None
    who = f"site {site.site_id}: job not approved"
    log = ApprovalLog.of(site)
    if recipe_json is None:
        raise NotApproved(f"{who}: the message carries no recipe (a server of another version?), and this site "
                          "runs approved recipes only")
    try:
        recipe = Recipe.from_json(recipe_json)
    except ProtocolError as error:
        raise NotApproved(f"{who}: {error}") from None
    try:
        app = fab_sha256()
    except (OSError, RuntimeError, ValueError) as error:
        raise NotApproved(f"{who}: the app's bundle hash cannot be computed ({error})") from None
    try:
        approvals = log.approvals()
    except (ApprovalLogError, OSError) as error:
        raise NotApproved(f"{who}: {error}") from None
    same_app = [a for a in approvals if a.entry.fab_sha256 == app]
    fitting = [a for a in same_app if a.covers_recipe(recipe)]
    active = [a for a in fitting if a.active]
    if not active:
        hint = f"review it and approve it with `braing3n site approve {site.source_file or 'SITE_YAML'} JOB`"
        if fitting:
            last = fitting[-1].revoked
            assert last is not None
            raise NotApproved(f"{who}: {fitting[-1].describe()} was revoked by {last.by} on {local_time(last.time)}"
                              + (f" ({last.reason})" if last.reason else ""))
        if not same_app:
            raise NotApproved(f"{who}: no approval in {log.path} for the app {_short(app)} (its Flower bundle hash); "
                              f"{hint}")
        raise NotApproved(f"{who}: recipe {recipe.name!r} {_short(recipe.sha256)} of app {_short(app)} is not covered "
                          f"by this site's approvals of that app ({', '.join(a.id for a in same_app)}); {hint}")
    try:
        outside = check_request(recipe, kind, config)
    except (ProtocolError, KeyError) as error:
        outside = f"a request that does not fit the recipe ({error})"
    if outside is not None:
        raise NotApproved(f"site {site.site_id}: request outside the approved recipe {recipe.name!r}: the server "
                          f"asked for {outside}")
    return active[-1]
