"""Alerts for the nightly speedrun: Prefect automations that post to a webhook.

Four automations watch the flow runs tagged `nightly` (every run of speedrun/nightly), one notification
per run each, all through one Custom Webhook block `speedrun-alerts`:

* speedrun-<tag>-failed       a run ended Failed or Crashed (reactive). A regression fails the run with
                              `RegressionDetected`, whose message names each metric, baseline, value, tolerance.
* speedrun-<tag>-late-start   a run has not started Running `--late-start-after` (1 h) after it went Late
                              (proactive). The server marks a Scheduled run Late once it is
                              PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS (15 s) past its scheduled time,
                              checking every ..._LATE_RUNS_LOOP_SECONDS (5 s), so the alert comes that much
                              (about 20 s) after the hour. Nobody polling the work pool is the usual cause.
* speedrun-<tag>-late-finish  a run that started Running has not reached Completed/Failed/Crashed/Cancelled
                              within the preset's expected duration (proactive): SpeedrunConfig.expected_duration_s
                              of the nightly deployment's preset and overrides (d24 if there is no such deployment),
                              or `--preset`, or `--expected-finish-after SECONDS`. The flow fails itself at twice that.
* speedrun-<tag>-completed    a run completed (reactive); the body starts with the flow's one-line verdict (its
                              final state message), e.g. `PASS d24@abc1234: min_val_bpb 0.7180, CORE 0.2626,
                              training 1.65 h`. `--no-success` leaves it out (and removes an installed one).

    python -m deployments.automations.nightly_alert --webhook-url https://hooks.slack.com/services/...

Run it against the server (PREFECT_API_URL); rerunning replaces the block and every automation, and
prints one line per automation installed.
The webhook gets JSON {"text": "<subject>\\n<body>"}, which Slack and most chat webhooks accept.
Proactive automations are checked every PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY (5 s), so they
fire up to that much after their window closes.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

BLOCK_NAME = "speedrun-alerts"
NIGHTLY_DEPLOYMENT = "speedrun/nightly"  # whose preset sets the default expected duration
DEFAULT_PRESET = "d24"
MIN_WINDOW_S = 10  # Prefect's minimum `within` for proactive triggers
FINAL_EVENTS = {f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Crashed", "Cancelled")}

RUN = "Flow run {{ flow_run.name }} ({{ flow_run.id }}) of deployment {{ deployment.name }}"
LINK = "{{ flow_run|ui_url }}"
FAILED_SUBJECT = "speedrun: {{ flow_run.name }} ended {{ flow_run.state.name }}"
FAILED_BODY = ("Deployment {{ deployment.name }}, flow run {{ flow_run.name }} ({{ flow_run.id }}) ended "
               "{{ flow_run.state.name }}.\nParameters: {{ flow_run.parameters }}\n{{ flow_run.state.message }}\n"
               + LINK)
SUCCESS_SUBJECT = "speedrun: {{ flow_run.name }} completed"
SUCCESS_BODY = "{{ flow_run.state.message }}\n" + RUN + " completed.\n" + LINK  # the verdict line first


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.2f} h"


def _notify(block_id, subject: str, body: str) -> list[SendNotification]:
    return [SendNotification(block_document_id=block_id, subject=subject, body=body)]


def _runs_tagged(tag: str) -> dict:
    """Trigger filters: events whose resource is a flow run and that relate to the tag (the run's, its deployment's)."""
    return {"match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.id": f"prefect.tag.{tag}"}}


def failed_automation(tag: str, block_id) -> Automation:
    """Reactive: any flow run related to the tag that enters Failed or Crashed, one alert each."""
    return Automation(
        name=f"speedrun-{tag}-failed",
        description=f"Notify {BLOCK_NAME} when a flow run tagged {tag!r} fails or crashes",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}, **_runs_tagged(tag),
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=_notify(block_id, FAILED_SUBJECT, FAILED_BODY),
    )


def late_start_automation(tag: str, block_id, after_s: float) -> Automation:
    """Proactive: after a run's Late event, expect it Running (or ended, e.g. cancelled) within `after_s`.

    The window opens at the Late mark, not at the Scheduled event: the scheduler creates runs days ahead
    of their start time, while the server's late-runs service marks a run Late only once it is past its
    scheduled time (plus PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS). One bucket per flow run.
    """
    return Automation(
        name=f"speedrun-{tag}-late-start",
        description=f"Notify {BLOCK_NAME} when a flow run tagged {tag!r} is not running {human(after_s)} "
                    "after it went Late",
        trigger=EventTrigger(after={"prefect.flow-run.Late"}, expect={"prefect.flow-run.Running", *FINAL_EVENTS},
                             for_each={"prefect.resource.id"}, **_runs_tagged(tag),
                             posture=Posture.Proactive, threshold=1, within=timedelta(seconds=after_s)),
        actions=_notify(
            block_id, "speedrun: {{ flow_run.name }} has not started",
            RUN + ", scheduled for {{ flow_run.expected_start_time }}, has not started running " + human(after_s)
            + " after it went Late; it is {{ flow_run.state.name }}. Is a worker polling work pool "
              "{{ work_pool.name }}?\n" + LINK),
    )


def late_finish_automation(tag: str, block_id, after_s: float) -> Automation:
    """Proactive: after a run's (first) Running event, expect a final state within `after_s`. One bucket per run."""
    return Automation(
        name=f"speedrun-{tag}-late-finish",
        description=f"Notify {BLOCK_NAME} when a flow run tagged {tag!r} has not finished {human(after_s)} "
                    "after it started running",
        trigger=EventTrigger(after={"prefect.flow-run.Running"}, expect=set(FINAL_EVENTS),
                             for_each={"prefect.resource.id"}, **_runs_tagged(tag),
                             posture=Posture.Proactive, threshold=1, within=timedelta(seconds=after_s)),
        actions=_notify(
            block_id, "speedrun: {{ flow_run.name }} still running after " + human(after_s),
            RUN + " started {{ flow_run.start_time }} and has not finished within its expected " + human(after_s)
            + "; it is {{ flow_run.state.name }}.\nParameters: {{ flow_run.parameters }}\n" + LINK),
    )


def success_automation(tag: str, block_id) -> Automation:
    """Reactive: a run completed; the body starts with its final state message, the flow's verdict line."""
    return Automation(
        name=f"speedrun-{tag}-completed",
        description=f"Notify {BLOCK_NAME} with the verdict when a flow run tagged {tag!r} completes",
        trigger=EventTrigger(expect={"prefect.flow-run.Completed"}, **_runs_tagged(tag),
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=_notify(block_id, SUCCESS_SUBJECT, SUCCESS_BODY),
    )


def expected_finish_s(preset: str | None = None) -> tuple[float, str]:
    """(seconds, where they come from): the preset's expected duration; without a preset, the nightly
    deployment's preset and overrides as the server has them, else DEFAULT_PRESET."""
    from tasks.config import load_config

    overrides, source = None, f"preset {preset}"
    if preset is None:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                params = client.read_deployment_by_name(NIGHTLY_DEPLOYMENT).parameters
            except ObjectNotFound:
                params = {}
        preset = params.get("preset", DEFAULT_PRESET)
        overrides = params.get("overrides")
        source = (f"{NIGHTLY_DEPLOYMENT}'s preset {preset}" if params
                  else f"preset {preset}; no {NIGHTLY_DEPLOYMENT} on the server")
    return load_config(preset, overrides=overrides).expected_duration_s, source


def _create_or_replace(automation: Automation) -> Automation:
    try:
        automation.id = Automation.read(name=automation.name).id
    except ValueError:  # not there yet
        return automation.create()
    automation.update()
    return automation


def install(webhook_url: str, tag: str = "nightly", late_start_after: float = 3600.0,
            expected_finish_after: float | None = None, preset: str | None = None,
            success: bool = True) -> list[Automation]:
    """Save the webhook block and create or replace the automations; returns those installed."""
    block = CustomWebhookNotificationBlock(name=BLOCK_NAME, url=webhook_url,
                                           json_data={"text": "{{subject}}\n{{body}}"})
    block_id = block.save(BLOCK_NAME, overwrite=True)
    if expected_finish_after is None:
        expected_finish_after, _ = expected_finish_s(preset)
    automations = [failed_automation(tag, block_id),
                   late_start_automation(tag, block_id, late_start_after),
                   late_finish_automation(tag, block_id, expected_finish_after)]
    if success:
        automations.append(success_automation(tag, block_id))
    else:  # a success automation left from an earlier install goes
        try:
            Automation.read(name=success_automation(tag, block_id).name).delete()
        except ValueError:
            pass
    return [_create_or_replace(a) for a in automations]


def _window(text: str) -> float:
    seconds = float(text)
    if seconds < MIN_WINDOW_S:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_WINDOW_S} s (Prefect's minimum for a proactive "
                                         "trigger)")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.automations.nightly_alert",
                                description=__doc__.split("\n")[0])
    p.add_argument("--webhook-url", required=True, help="where to POST the alerts (Slack, Teams, any JSON webhook)")
    p.add_argument("--tag", default="nightly", help="watch flow runs carrying this tag (default: nightly)")
    p.add_argument("--late-start-after", type=_window, default=3600.0, metavar="SECONDS",
                   help="alert when a run has not started this long after it went Late (default: 3600)")
    p.add_argument("--expected-finish-after", type=_window, default=None, metavar="SECONDS",
                   help="alert when a run has not finished this long after it started (default: the preset's "
                        "expected duration)")
    p.add_argument("--preset", default=None,
                   help=f"preset whose expected duration is the late-finish window (default: {NIGHTLY_DEPLOYMENT}'s "
                        f"preset on the server, else {DEFAULT_PRESET})")
    p.add_argument("--no-success", action="store_true", help="no notification when a run completes")
    args = p.parse_args(argv)
    if args.expected_finish_after is None:
        args.expected_finish_after, source = expected_finish_s(args.preset)
    else:
        source = f"--expected-finish-after {args.expected_finish_after:g}"
    automations = install(args.webhook_url, args.tag, args.late_start_after, args.expected_finish_after,
                          success=not args.no_success)
    for a in automations:
        note = f" (expected duration of {source})" if a.name.endswith("-late-finish") else ""
        print(f"{a.name} ({a.id}): {a.description}{note}")
    print(f"all post to {args.webhook_url} via block {BLOCK_NAME!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
