"""pipelines.docker_runner without a container engine: what each step's container gets (the run's image for
the parameterised one, the spec's command as the entrypoint, the forwarded settings), and the dataset copy."""

from __future__ import annotations

import pytest
from kfp import local
from kfp.local import docker_task_handler

from pipelines.docker_runner import docker_runner, forwarded_environment, project_image_steps
from pipelines.local_run import dataset_under
from qfm.errors import ConfigError

PLACEHOLDER = "{{$.inputs.parameters['pipelinechannel--image']}}"


def test_steps_get_the_runs_image_and_their_command_as_the_entrypoint(tmp_path):
    runner = local.DockerRunner(network_mode="host")
    with project_image_steps("localhost/qfm:0.1.0-cuda-0123456789ab"):
        handler = docker_task_handler.DockerTaskHandler(image=PLACEHOLDER, full_command=["sh", "-ec", "run", "x"],
                                                        pipeline_root=str(tmp_path), runner=runner, env_vars={})
        other = docker_task_handler.DockerTaskHandler(image="busybox:1", full_command=["echo"],
                                                      pipeline_root=str(tmp_path), runner=runner, env_vars={})
    assert handler.image == "localhost/qfm:0.1.0-cuda-0123456789ab" and other.image == "busybox:1"
    assert handler.runner.container_run_args == {"network_mode": "host", "entrypoint": ["sh"]}
    assert handler.full_command == ["-ec", "run", "x"]
    assert runner.container_run_args == {"network_mode": "host"}  # the shared runner is left as it was
    assert docker_task_handler.DockerTaskHandler.__name__ == "DockerTaskHandler"  # restored on exit
    with pytest.raises(ConfigError, match="is not an image name"), project_image_steps(PLACEHOLDER):
        pass


def test_steps_get_the_mlflow_s3_and_qfm_settings_but_keep_the_images_commit():
    environ = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k", "QFM_PIPELINE_RUN": "r",
               "OMP_NUM_THREADS": "1", "QFM_GIT_COMMIT": "abc1234", "HOME": "/root", "PATH": "/usr/bin"}
    assert forwarded_environment(environ) == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k",
                                              "QFM_PIPELINE_RUN": "r", "OMP_NUM_THREADS": "1"}
    runner = docker_runner(environ)
    assert runner.container_run_args["network_mode"] == "host"
    assert runner.container_run_args["environment"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_the_dataset_is_copied_under_the_pipeline_root_afresh(tmp_path):
    dataset = tmp_path / "demo"
    (dataset / "images").mkdir(parents=True)
    (dataset / "images" / "a.png").write_bytes(b"x")
    out = tmp_path / "kfp"
    copy = dataset_under(dataset, out)
    assert copy == out.resolve() / "datasets" / "demo" and (copy / "images" / "a.png").read_bytes() == b"x"
    (dataset / "images" / "a.png").unlink()
    (dataset / "images" / "b.png").write_bytes(b"y")
    assert dataset_under(dataset, out) == copy and sorted(p.name for p in (copy / "images").iterdir()) == ["b.png"]
    assert dataset_under(copy, out) == copy
