"""kfp.local's DockerRunner for the qfm pipelines: every step in the project image, as on a cluster.

The Docker API is the one `docker` (the Python package) finds in the environment: DOCKER_HOST, e.g.
unix:///run/qfm-podman.sock for `podman system service` (tests/test_container.py starts one). The steps run
with the host's network (MLflow and S3 on 127.0.0.1 are reached as from this process) and get this
process's MLflow, S3 and thread settings (the variables named below), as the SubprocessRunner's steps
inherit them. kfp.local mounts only the pipeline root into each container, so the dataset must lie under it
(pipelines.local_run copies it there).

kfp.local (2.17) runs the image string of the compiled spec as it stands, and the qfm steps' image is the
pipeline parameter `image` ('{{$.inputs.parameters[...]}}', resolved by the KFP backend on a cluster): here
that placeholder is replaced by the image of the run.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

from qfm.errors import ConfigError

# Settings the steps take from the environment (the cluster gives them from secrets).
FORWARDED_PREFIXES = ("MLFLOW_", "AWS_", "QFM_")
FORWARDED_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TZ")
# The image's own settings, never overridden from the host.
KEPT_IN_IMAGE = ("QFM_GIT_COMMIT",)
_PLACEHOLDER = "{{$.inputs.parameters["


def forwarded_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default os.environ) the steps get inside their containers."""
    environ = dict(os.environ if environ is None else environ)
    return {name: value for name, value in environ.items()
            if (name.startswith(FORWARDED_PREFIXES) or name in FORWARDED_NAMES) and name not in KEPT_IN_IMAGE}


def check_engine() -> str:
    """The Docker API's version string; ConfigError saying what to start when none answers."""
    try:
        import docker

        client = docker.from_env(timeout=30)
        try:
            return client.version().get("Version", "unknown")
        finally:
            client.close()
    except Exception as exc:  # docker.errors.DockerException and connection errors alike
        raise ConfigError(f"no Docker API answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(unset)')} ({exc}): "
                          "start one (e.g. `podman system service --time=0 unix:///run/qfm-podman.sock`) and "
                          "set DOCKER_HOST to it") from exc


@contextlib.contextmanager
def project_image_steps(image: str) -> Iterator[None]:
    """Within: kfp.local's Docker task handler runs `image` wherever a step's image is a pipeline parameter."""
    from kfp.local import docker_task_handler, task_dispatcher

    if not image.strip() or image.startswith(_PLACEHOLDER):
        raise ConfigError(f"--docker image {image!r} is not an image name, e.g. localhost/qfm:0.1.0-cuda-<commit>")
    original = docker_task_handler.DockerTaskHandler

    class ProjectImageTaskHandler(original):
        """The run's image for a parameterised one; the spec's command replaces the image's ENTRYPOINT (qfm)
        as a Kubernetes container `command` does (the Docker API's `command` would only replace CMD)."""

        def __init__(self, image: str, *args, **kwargs) -> None:
            super().__init__(*args, image=run_image if image.startswith(_PLACEHOLDER) else image, **kwargs)
            if self.full_command and "entrypoint" not in self.runner.container_run_args:
                self.runner = copy.copy(self.runner)
                self.runner.container_run_args = {**self.runner.container_run_args,
                                                  "entrypoint": [self.full_command[0]]}
                self.full_command = list(self.full_command[1:])

    run_image = image
    docker_task_handler.DockerTaskHandler = ProjectImageTaskHandler
    try:
        if not task_dispatcher._DOCKER_AVAILABLE:  # kfp checks `import docker` once, at import
            raise ConfigError("the `docker` Python package is missing: pip install docker")
        yield
    finally:
        docker_task_handler.DockerTaskHandler = original


def docker_runner(environ: dict[str, str] | None = None):
    """A DockerRunner on the host's network with the forwarded environment."""
    from kfp import local

    return local.DockerRunner(network_mode="host", environment=forwarded_environment(environ))
