"""The nightly's pull step: clone or update the branch head, or fail the run saying why.

speedrun/nightly (prefect.yaml) runs this step in the flow-run process before the flow is loaded, from the
worker's installed copy of this package (no checkout of the branch exists yet):

    pull:
    - prefect.deployments.steps.set_working_directory: {directory: "{{ $SPEEDRUN_NIGHTLY_DIR }}"}
    - deployments.nightly_pull.pull_branch:
        id: checkout
        repository: "{{ $SPEEDRUN_REPOSITORY }}"
        branch: main
    - prefect.deployments.steps.set_working_directory: {directory: "{{ checkout.directory }}"}

Prefect's own `git_clone` step does the clone (first night) or the pull (later nights). What this adds:
a failed pull would otherwise end the run as Crashed with "Process exited with status code: 1", its cause
only in the worker's log. Here the branch is looked up first (`git ls-remote`), and on any failure the run
is set Failed with a message naming the repository, the branch, git's own error and the fix.
"""

from __future__ import annotations

import os
import subprocess

from prefect.deployments.steps import git_clone

LS_REMOTE_TIMEOUT_S = 120


class NightlyPullError(RuntimeError):
    """The nightly could not get the branch head; the message says why and what to fix."""


def pull_branch(repository: str, branch: str, clone_directory_name: str = "speedrun",
                **git_clone_options) -> dict[str, str]:
    """Clone `branch` of `repository` into ./<clone_directory_name>, or pull it there; returns {"directory"}.

    `git_clone_options` go to Prefect's git_clone as they are (access_token, credentials, include_submodules).
    With credentials, the branch is not looked up beforehand: plain git would not have them."""
    try:
        if not (git_clone_options.get("access_token") or git_clone_options.get("credentials")):
            check_branch(repository, branch)
        try:
            return git_clone(repository=repository, branch=branch, clone_directory_name=clone_directory_name,
                             **git_clone_options)
        except Exception as exc:  # noqa: BLE001 - whatever git or Prefect raised, the run must say it
            raise NightlyPullError(f"the nightly could not clone or pull branch {branch!r} of {repository} into "
                                   f"{os.path.join(os.getcwd(), clone_directory_name)}: {exc}") from exc
    except NightlyPullError as exc:
        fail_flow_run(str(exc))
        raise


def check_branch(repository: str, branch: str) -> None:
    """Raise NightlyPullError unless `repository` is set and has `branch` (git's error in the message)."""
    if not repository or "{{" in repository:
        raise NightlyPullError("the nightly has no repository to pull: SPEEDRUN_REPOSITORY is not set in the "
                               "worker's environment; fix: start the worker with SPEEDRUN_REPOSITORY=<git URL or "
                               "path> (README: The nightly run)")
    try:
        found = subprocess.run(["git", "ls-remote", "--exit-code", "--heads", repository, branch],
                               capture_output=True, text=True, timeout=LS_REMOTE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NightlyPullError(f"the nightly could not reach {repository}: {exc}") from exc
    if found.returncode == 2:  # --exit-code: the repository answered, the branch is not there
        raise NightlyPullError(f"the nightly's branch {branch!r} does not exist in {repository}; fix: push it, or "
                               f"set `branch` in the nightly's pull step in prefect.yaml and redeploy")
    if found.returncode != 0:
        said = " ".join(found.stderr.split()) or f"exit code {found.returncode}"  # one line, for the run's state
        raise NightlyPullError(f"the nightly could not read {repository}: git says {said}; fix: check the URL "
                               f"(SPEEDRUN_REPOSITORY) and the worker's git credentials")


def fail_flow_run(message: str) -> None:
    """Set this flow run Failed with `message` (the runner then leaves it Failed, not Crashed)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not flow_run_id:
        return  # not inside a deployment run: the exception says it all
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Failed(message=message), force=True)
