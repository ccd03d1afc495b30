"""Alert when a nightly speedrun fails: a Prefect automation that posts to a webhook.

A flow run tagged `nightly` (every run of speedrun/nightly) that ends Failed or Crashed triggers a
notification through a Custom Webhook block. A regression fails the run with `RegressionDetected`,
whose message names every metric, its baseline, value and tolerance, so the alert carries it.

    python -m deployments.automations.nightly_alert --webhook-url https://hooks.slack.com/services/...

Run it once against the server (PREFECT_API_URL); rerunning replaces the block and the automation.
The webhook gets JSON {"text": "<subject>\\n<body>"}, which Slack and most chat webhooks accept.
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
SUBJECT = "speedrun: {{ flow_run.name }} ended {{ flow_run.state.name }}"
BODY = """Deployment {{ deployment.name }}, flow run {{ flow_run.name }} ({{ flow_run.id }}) ended {{ flow_run.state.name }}.
Parameters: {{ flow_run.parameters }}
{{ flow_run.state.message }}
{{ flow_run|ui_url }}"""


def alert_automation(tag: str, block_id) -> Automation:
    """Reactive trigger: any flow run related to the tag that enters Failed or Crashed, one alert each."""
    return Automation(
        name=f"speedrun-{tag}-failed",
        description=f"Notify {BLOCK_NAME} when a flow run tagged {tag!r} fails or crashes",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.tag.{tag}"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    )


def install(webhook_url: str, tag: str = "nightly") -> Automation:
    block = CustomWebhookNotificationBlock(name=BLOCK_NAME, url=webhook_url,
                                           json_data={"text": "{{subject}}\n{{body}}"})
    block_id = block.save(BLOCK_NAME, overwrite=True)
    automation = alert_automation(tag, block_id)
    try:
        existing = Automation.read(name=automation.name)
    except ValueError:
        existing = None
    if existing is not None:
        automation.id = existing.id
        automation.update()
    else:
        automation.create()
    return automation


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.automations.nightly_alert", description=__doc__.split("\n")[0])
    p.add_argument("--webhook-url", required=True, help="where to POST the alert (Slack, Teams, any JSON webhook)")
    p.add_argument("--tag", default="nightly", help="alert on failed flow runs carrying this tag (default: nightly)")
    args = p.parse_args(argv)
    automation = install(args.webhook_url, args.tag)
    print(f"automation {automation.name!r} ({automation.id}) posts to {args.webhook_url} via block {BLOCK_NAME!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
