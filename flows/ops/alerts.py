"""Releases told through Prefect's own machinery: the flows emit an event when a release is
published and when one fails its gates (`announce`), and `music deploy` registers automations
(`register_automations`) that send a notification through a notification block when a rebuild
deployment's run fails or crashes, when a gate fails, when a release is published, and when a
rebuild has run `MUSIC_ALERT_LATE_HOURS` without completing.

Events: `music.release.published` and `music.release.gate-failed`, resource `music.release.<spec>`
(name: the spec), payload: spec, kind, release, parent, samples, the diff's counts and the failed
gates. The automations' notification texts are Jinja templates over the event."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from music_model import settings
from tasks.publishing import releases

PUBLISHED = "music.release.published"
GATE_FAILED = "music.release.gate-failed"
WEBHOOK_BLOCK = "music-alerts"
AUTOMATION_PREFIX = "music: "
# The rebuild deployments of prefect.yaml whose runs the failure and lateness automations watch.
REBUILDS = ("rebuild", "rebuild-tiny", "regenerate")


class GateFailed(RuntimeError):
    """A rebuild's release failed its quality gates: kept as a rejected candidate, not made current."""


def release_lines(spec_name: str, kind: str, release: dict) -> list[str]:
    """The failed gates, one line each, naming the spec and the release."""
    return [f"{spec_name} {kind} {release['version']}: {line}" for line in release["failed_gates"]]


def announce(spec_name: str, folder: Path, result: dict, before: str | None, key: str) -> None:
    """After a publish: a Prefect event for a gate failure (the flow then fails) or for a release
    that became current (`before`: the current release before the publish; none when unchanged),
    and the release's diff as a markdown artifact under `key`, the spec's (its history is the releases)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    release = result["release"]
    published = release["status"] == "accepted" and release["version"] != before
    if not published and release["status"] != "rejected":
        return
    diff_path = releases.releases_dir(folder) / release["version"] / releases.DIFF
    change = json.loads(diff_path.read_text())
    payload = {"spec": spec_name, "kind": folder.name, "release": release["version"], "parent": release["parent"],
               "samples": release["samples"], **(release["diff"] or {}), "failed_gates": release["failed_gates"],
               "summary": releases.diff_lines(change, limit=5)[0]}
    emit_event(event=PUBLISHED if published else GATE_FAILED,
               resource={"prefect.resource.id": f"music.release.{spec_name}", "prefect.resource.name": spec_name},
               payload=payload)
    status = "published" if published else "rejected (" + "; ".join(release["failed_gates"]) + ")"
    create_markdown_artifact("\n".join([f"# {spec_name} {folder.name} {release['version']}: {status}", "",
                                        *releases.diff_lines(change)]),
                             key=key, description=f"releases of {spec_name}: each run's diff")


# --- automations --------------------------------------------------------------------------------------


def notification_block_id(webhook: str | None = None, block: str | None = None):
    """The notification block the automations send through: a saved one (`type-slug/name`), or a
    Custom Webhook block saved as `music-alerts` that POSTs {subject, body} as JSON to `webhook`."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    webhook = webhook or settings.ALERT_WEBHOOK.get()
    block = block or settings.ALERT_BLOCK.get()
    if block:
        return Block.load(block)._block_document_id
    if not webhook:
        return None
    saved = CustomWebhookNotificationBlock(name=WEBHOOK_BLOCK, url=webhook,
                                           json_data={"subject": "{{subject}}", "body": "{{body}}"})
    return saved.save(WEBHOOK_BLOCK, overwrite=True)


def register_automations(webhook: str | None = None, block: str | None = None, late: timedelta | None = None) -> list[str]:
    """Create (or replace) the MUSIC automations on the server; their names. None without a block
    or webhook (`MUSIC_ALERT_WEBHOOK`, `MUSIC_ALERT_BLOCK`)."""
    from prefect import get_client
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_id = notification_block_id(webhook, block)
    if block_id is None:
        return []
    late = late or timedelta(hours=settings.ALERT_LATE_HOURS.number())
    with get_client(sync_client=True) as client:
        deployment_ids = [str(d.id) for d in client.read_deployments() if d.name in REBUILDS]
    rebuild_runs = {"prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids] or "prefect.deployment.none",
                    "prefect.resource.role": "deployment"}
    run = "{{ event.resource.name }} ({{ event.related | map(attribute='name') | select | join(', ') }})"
    wanted = {
        "release gate failed": (EventTrigger(expect={GATE_FAILED}, match={"prefect.resource.id": "music.release.*"},
                                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
                                "MUSIC {{ event.payload.spec }}: release {{ event.payload.release }} rejected",
                                "{{ event.payload.spec }} {{ event.payload.kind }} {{ event.payload.release }} failed its gates and "
                                "was kept as a rejected candidate ({{ event.payload.parent }} stays current):\n"
                                "{{ event.payload.failed_gates | join('\n') }}\n{{ event.payload.summary }}"),
        "release published": (EventTrigger(expect={PUBLISHED}, match={"prefect.resource.id": "music.release.*"},
                                           posture=Posture.Reactive, threshold=1, within=timedelta(0)),
                              "MUSIC {{ event.payload.spec }}: release {{ event.payload.release }} published",
                              "{{ event.payload.spec }} {{ event.payload.kind }} {{ event.payload.release }} is current: "
                              "{{ event.payload.summary }}"),
        "rebuild failed": (EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                                        match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=rebuild_runs,
                                        posture=Posture.Reactive, threshold=1, within=timedelta(0)),
                           "MUSIC rebuild {{ event.resource.name }}: {{ event.event.split('.')[-1] }}",
                           "Flow run " + run + " ended {{ event.event.split('.')[-1] }}: {{ event.payload.validated_state.message }}"),
        "rebuild late": (EventTrigger(after={"prefect.flow-run.Running"}, expect={"prefect.flow-run.Completed"},
                                      match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=rebuild_runs,
                                      for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=late),
                         "MUSIC rebuild late",
                         f"A rebuild flow run has been running {late} without completing."),
    }
    names = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if automation.name.startswith(AUTOMATION_PREFIX):
                client.delete_automation(automation.id)
    for name, (trigger, subject, body) in wanted.items():
        Automation(name=AUTOMATION_PREFIX + name, trigger=trigger,
                   actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)]).create()
        names.append(AUTOMATION_PREFIX + name)
    return names
